"""The existing head analyses, run unchanged (task layer, CLI jobs, sweep cells) on a vision encoder (ViT, on the
``images`` suite) and on Flux (its denoiser, on the ``latents`` suite; the sweep and importance on SD3 too).

References written here, without attnscope code: the ViT's own eager attentions; Flux attention weights recorded
from ``softmax(q k^T * scale) v`` in place of its SDPA call; head ablation by plain forward pre-hooks that zero a
head's slice of the inputs of the layers reading the head outputs (ViT ``o_proj``; Flux double-stream ``to_out[0]``
and ``to_add_out``, single-stream ``proj_out``'s attention columns); metrics computed by hand: cosine of
mean-pooled embeddings to the clean model's (ViT, no head) and the mean squared error against the velocity
``noise - x0`` (Flux); importance by autograd through gates on those slices.
"""

import math
from contextlib import ExitStack, contextmanager, nullcontext

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import attnscope
from attnscope.datasets.image_suite import image_suite
from attnscope.datasets.latent_suite import latent_suite
from attnscope.errors import InputError
from attnscope.probes.coverage import ARCHITECTURES
from attnscope.probes.heads import HeadSet
from attnscope.probes.tower_heads import resolve_heads
from attnscope.sweeps.cells import run_cell
from attnscope.sweeps.spec import parse_spec
from attnscope.tasks.ablation_job import AblationRequest, run_ablation_job
from attnscope.tasks.analyses import get_analysis, run_analysis
from attnscope.tasks.pruning_job import PruneRequest, run_prune_job
from attnscope.tasks.references import ModelRef, SuiteRef
from attnscope.tasks.task_eval import EvalSpec

N_ITEMS = 4
OFFERED = {"batch_size": N_ITEMS, "progress": False}


@pytest.fixture(scope="module")
def vit():
    return ARCHITECTURES["vit"].builder()


@pytest.fixture(scope="module")
def flux():
    return ARCHITECTURES["flux"].builder()


@pytest.fixture(scope="module")
def sd3():
    return ARCHITECTURES["sd3"].builder()


def suite_of(model):
    return image_suite(model, N_ITEMS, seed=0) if hasattr(model.config, "image_size") else latent_suite(
        model, N_ITEMS, seed=0)


def batch_inputs(suite):
    """Every item's forward tensors concatenated (one batch), with the suite's shared tensors."""
    return next(suite.batches(len(suite))).inputs


# ---- references: attention weights ------------------------------------------------------------------------------


def vit_patterns(model, inputs):
    """``[layer, item, head, query, key]`` from the ViT's own eager attention."""
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(**inputs, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    return np.stack([a.double().numpy() for a in out.attentions])


@contextmanager
def recorded_sdpa(store):
    """``scaled_dot_product_attention`` written out (no mask, as Flux calls it), recording the weights."""
    real = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        assert attn_mask is None and not is_causal
        logits = query.double() @ key.double().transpose(-1, -2) * (scale or query.shape[-1] ** -0.5)
        weights = torch.softmax(logits, -1)
        store.append(weights.numpy())
        return (weights @ value.double()).to(query.dtype)
    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


def flux_patterns(model, inputs):
    store = []
    with recorded_sdpa(store), torch.no_grad():
        model(**inputs)
    return np.stack(store)  # [block, item, head, query, key]: the double block, then the single block


def patterns_of(model, suite):
    inputs = batch_inputs(suite)
    return vit_patterns(model, inputs) if suite.kind == "images" else flux_patterns(model, inputs)


# ---- references: head-output slices, metrics ----------------------------------------------------------------------


def head_readers(model):
    """Per layer (attnscope's numbering: forward order), the linears reading its head outputs, and ``d_head``."""
    if hasattr(model, "layers"):  # ViT
        d = model.config.hidden_size // model.config.num_attention_heads
        return [[layer.attention.o_proj] for layer in model.layers], d
    d = model.config.attention_head_dim
    joint = [[b.attn.to_out[0]] + ([b.attn.to_add_out] if b.attn.to_add_out is not None else [])  # SD3's last
             for b in model.transformer_blocks]                                                     # block: no text out
    return joint + [[b.proj_out] for b in getattr(model, "single_transformer_blocks", [])], d


@contextmanager
def gated(model, gates):
    """Multiply head ``h`` of layer ``l``'s slice of every reader's input by ``gates[l][h]`` (plain pre-hooks)."""
    readers, d = head_readers(model)

    def hook_for(layer):
        def hook(module, args):
            x = args[0]
            factors = torch.ones(x.shape[-1], dtype=x.dtype)
            factors[:len(gates[layer]) * d] = gates[layer].to(x.dtype).repeat_interleave(d)
            return (x * factors,) + args[1:]
        return hook
    handles = [r.register_forward_pre_hook(hook_for(layer)) for layer, rs in enumerate(readers) for r in rs]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def zero_gates(model, heads):
    n_layers = len(head_readers(model)[0])
    n_heads = model.config.num_attention_heads
    gates = torch.ones(n_layers, n_heads)
    for layer, head in heads:
        gates[layer, head] = 0.0
    return gates


def item_losses(model, suite, reference=None, gates=None):
    """Per item: 1 - nothing: cosine of the mean-pooled embedding to ``reference`` (ViT), or the MSE against the
    velocity target (Flux); with ``gates`` applied through plain hooks."""
    inputs = batch_inputs(suite)
    gates = gates if gates is not None else zero_gates(model, [])
    with gated(model, gates):
        out = model(**inputs)
    if suite.kind == "images":
        return out.last_hidden_state.mean(1)
    target = torch.cat([item.target for item in suite.items])
    return ((out.sample.double() - target.double()) ** 2).flatten(1).mean(1)


def metric_value(model, suite, heads=(), edit=None):
    """The suite's metric by hand with ``heads`` zeroed (plain hooks), or under ``edit`` (a context of plain hooks)."""
    with torch.no_grad():
        with edit if edit is not None else nullcontext():
            value = item_losses(model, suite, gates=zero_gates(model, heads))
        if suite.kind == "images":
            clean = item_losses(model, suite)
            return float(F.cosine_similarity(value.double(), clean.double(), dim=-1).mean())
        return float(value.mean())


def grid(table, metric, n_layers, n_heads):
    df = table.df[table.df.metric == metric]
    out = np.full((n_layers, n_heads), np.nan)
    for row in df.itertuples():
        out[int(row.layer), int(row.head)] = row.value
    return out


# ---- detectors and head statistics --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vit", "flux"])
def test_head_stats_and_prev_token_equal_numpy_on_reference_weights(name, request):
    model = request.getfixturevalue(name)
    suite = suite_of(model)
    weights = patterns_of(model, suite)  # [layer, item, head, query, key]
    n_layers, n_heads = weights.shape[0], weights.shape[2]
    handle = attnscope.load(model)
    stats = run_analysis(get_analysis("head-stats"), handle, suite, {}, offered=OFFERED)
    np.testing.assert_allclose(grid(stats, "sink_mass", n_layers, n_heads), weights[..., 0].mean((1, 3)),
                               atol=1e-5)
    entropy = -(weights * np.log(np.clip(weights, 1e-30, None))).sum(-1).mean((1, 3))
    np.testing.assert_allclose(grid(stats, "entropy", n_layers, n_heads), entropy, atol=1e-4)
    prev = run_analysis(get_analysis("prev-token"), handle, suite, {}, offered=OFFERED)
    n = weights.shape[-1]
    on_previous = weights[..., np.arange(1, n), np.arange(n - 1)]  # rows 1.., mass on key t - 1
    np.testing.assert_allclose(grid(prev, "score", n_layers, n_heads), on_previous.mean((1, 3)), atol=1e-5)
    assert weights.shape[-1] == suite.n_tokens and entropy.min() > 0.1  # the whole sequence, not degenerate


@pytest.mark.parametrize("name", ["vit", "flux"])
def test_token_identity_detectors_refuse_images_and_latents(name, request):
    model = request.getfixturevalue(name)
    handle = attnscope.load(model)
    for analysis in ("duplicate", "induction", "sinks"):
        with pytest.raises(InputError) as info:
            run_analysis(get_analysis(analysis), handle, suite_of(model), {}, offered=OFFERED)
        assert info.value.expected and info.value.got and "head-stats" in info.value.fix


# ---- ablation sweep, importance ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vit", "flux", "sd3"])
def test_ablation_sweep_rows_equal_plain_hook_ablations(name, request):
    model = request.getfixturevalue(name)
    suite = suite_of(model)
    table = run_analysis(get_analysis("ablation-sweep"), attnscope.load(model), suite, {}, offered=OFFERED)
    n_layers = len(head_readers(model)[0])
    assert len(table) == n_layers * model.config.num_attention_heads
    assert set(table.df.metric) == {"embedding_cosine" if name == "vit" else "denoising_loss"}
    if name == "sd3":  # one tower of joint blocks: no per-tower names
        assert "tower_head" not in table.df
    clean = metric_value(model, suite)
    for row in table.df.itertuples():
        assert row.clean == pytest.approx(clean, abs=1e-6)
        assert row.value == pytest.approx(metric_value(model, suite, [(row.layer, row.head)]), abs=1e-5)
    assert table.df.delta.abs().max() > 1e-3
    if name == "flux":  # two towers: every row also named per tower, and the name resolves to the row's head
        assert sorted(table.df.tower_head) == [f"flux.{b}.joint.L0H{h}" for b in ("double", "single") for h in (0, 1)]
        for row in table.df.itertuples():
            assert resolve_heads(row.tower_head, model) == HeadSet([(row.layer, row.head)])
    elif name == "vit":
        assert "tower_head" not in table.df


def reference_importance(model, suite):
    """|d mean-loss / d gate| through plain hooks: ViT, the in-batch contrastive loss of the embedding metric
    (``-log softmax_j(cos(e_i, ref_j) / 0.05)[i]``); Flux, the MSE against the velocity."""
    gates = zero_gates(model, []).requires_grad_(True)
    if suite.kind == "images":
        with torch.no_grad():
            reference = F.normalize(item_losses(model, suite).double(), dim=-1)
        embedding = F.normalize(item_losses(model, suite, gates=gates).double(), dim=-1)
        logits = embedding @ reference.T / 0.05
        loss = F.cross_entropy(logits, torch.arange(len(suite)), reduction="none")
    else:
        loss = item_losses(model, suite, gates=gates)
    loss.mean().backward()
    return gates.grad.abs().numpy()


@pytest.mark.parametrize("name", ["vit", "flux", "sd3"])
def test_importance_equals_autograd_through_plain_head_gates(name, request):
    model = request.getfixturevalue(name)
    suite = suite_of(model)
    table = run_analysis(get_analysis("importance"), attnscope.load(model), suite,
                         {"variant": "abs_of_sum", "normalize_layers": False}, offered=OFFERED)
    expected = reference_importance(model, suite)
    got = grid(table, "importance_raw", *expected.shape)
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-7)
    assert expected.max() > 1e-4


# ---- CLI jobs: ablate (zero, mean), prune; sweep cells ----------------------------------------------------------


def spec_for(folder, name, **options):
    return EvalSpec(ModelRef("source", str(folder)), SuiteRef("images" if name == "vit" else "latents"),
                    n_items=N_ITEMS, batch_size=N_ITEMS, **options)


@pytest.fixture(scope="module")
def folders(vit, flux, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for name, model in (("vit", vit), ("flux", flux)):
        model.save_pretrained(root / name)
    return root


@pytest.mark.parametrize("name", ["vit", "flux"])
def test_ablate_job_zero_and_mean_equal_hook_references(name, request, folders):
    model = request.getfixturevalue(name)
    suite = suite_of(model)  # what the job builds: default seed 0
    zero = run_ablation_job(AblationRequest(spec_for(folders / name, name), "L1H0", "zero"))
    assert zero.before == pytest.approx(metric_value(model, suite), abs=1e-6)
    assert zero.after == pytest.approx(metric_value(model, suite, [(1, 0)]), abs=1e-5)
    # mean: the head's output replaced by its mean over every position of the reference set (the suite, seed 1)
    reference = batch_inputs(image_suite(model, N_ITEMS, seed=1) if name == "vit" else latent_suite(
        model, N_ITEMS, seed=1))
    readers, d = head_readers(model)
    recorded = []
    hook = readers[1][0].register_forward_pre_hook(lambda m, args: recorded.append(args[0][..., :d].clone()))
    with torch.no_grad():
        model(**reference)
    hook.remove()
    mean = recorded[0].double().flatten(0, 1).mean(0)

    def set_mean(module, args):
        x = args[0].clone()
        x[..., :d] = mean.to(x.dtype)
        return (x,) + args[1:]
    with ExitStack() as mean_written:
        for reader in readers[1]:
            mean_written.enter_context(reader.register_forward_pre_hook(set_mean))
        expected = metric_value(model, suite, edit=mean_written.pop_all())
    got = run_ablation_job(AblationRequest(spec_for(folders / name, name), "L1H0", "mean")).after
    assert got == pytest.approx(expected, abs=1e-5)
    assert abs(got - zero.before) > 1e-4


@pytest.mark.parametrize("name", ["vit", "flux"])
def test_prune_job_saves_a_model_equal_to_hook_zeroing(name, request, folders, tmp_path):
    model = request.getfixturevalue(name)
    result = run_prune_job(PruneRequest(spec_for(folders / name, name), tmp_path / "pruned", keep_metric=0.5,
                                        masking_amount=0.25))
    pruned = sorted(result.pruning.pruned)
    assert pruned  # a random-init model loses little: heads were pruned
    suite = suite_of(model)
    assert result.pruning.final == pytest.approx(metric_value(model, suite, pruned), abs=1e-5)
    saved = attnscope.load(str(tmp_path / "pruned" / "model")).module
    inputs = batch_inputs(suite)
    with torch.no_grad():
        with gated(model, zero_gates(model, pruned)):
            expected = model(**inputs)[0]
        torch.testing.assert_close(saved(**inputs)[0], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["vit", "flux"])
def test_sweep_cell_under_an_intervention_equals_hook_ablation(name, request, folders):
    model = request.getfixturevalue(name)
    spec = {"models": [str(folders / name)],
            "suites": [{"generator": "images" if name == "vit" else "latents", "n_items": N_ITEMS}],
            "analyses": [{"name": "ablation-sweep", "options": {"batch_size": N_ITEMS}}],
            "interventions": [{"heads": "L0H1", "mode": "zero"}]}
    cell, = parse_spec(spec).cells()
    df = run_cell(cell.to_dict(), cache=False)["df"]
    suite = suite_of(model)
    if name == "flux":  # the sweep's clean run already has L0H1 zeroed: its metric is the hook-zeroed one
        assert float(df.clean.iloc[0]) == pytest.approx(metric_value(model, suite, [(0, 1)]), abs=1e-5)
        row = df[(df.layer == 1) & (df["head"] == 0)]
        assert float(row.value.iloc[0]) == pytest.approx(metric_value(model, suite, [(0, 1), (1, 0)]), abs=1e-5)
    else:  # the cosine is taken to the run's own clean embeddings (L0H1 zeroed), computed by hand here
        with torch.no_grad():
            base = item_losses(model, suite, gates=zero_gates(model, [(0, 1)]))
            both = item_losses(model, suite, gates=zero_gates(model, [(0, 1), (1, 0)]))
        row = df[(df.layer == 1) & (df["head"] == 0)]
        expected = float(F.cosine_similarity(both.double(), base.double(), dim=-1).mean())
        assert float(row.value.iloc[0]) == pytest.approx(expected, abs=1e-5)


def test_suite_built_for_another_model_and_wrong_kind_are_refused(vit, flux):
    with pytest.raises(InputError) as info:
        run_analysis(get_analysis("ablation-sweep"), attnscope.load(flux), suite_of(vit), {}, offered=OFFERED)
    assert info.value.expected == "ViTModel" and info.value.got == "FluxTransformer2DModel"
    with pytest.raises(InputError) as info:
        latent_suite(vit)
    assert "Flux" in str(info.value.expected) and info.value.fix
    with pytest.raises(InputError) as info:
        image_suite(flux)
    assert info.value.fix
    sigmas = [float(item.inputs["timestep"]) for item in latent_suite(flux, 8, seed=3).items]
    assert all(0.2 <= s <= 0.8 for s in sigmas) and len(set(sigmas)) == 8 and not math.isnan(sum(sigmas))


def test_a_classifier_is_scored_by_agreement_with_its_own_clean_predictions():
    """A ViT classifier on the images suite: labels are its clean top-1 classes, so the sweep's clean accuracy is
    1 and each row is the fraction of images whose top-1 class survives the head's edit (plain hooks; a rescale by
    10, which flips predictions of this random-init model where a zeroed head would not)."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 image_size=16, patch_size=4, num_labels=5)
    model = transformers.ViTForImageClassification(cfg).eval()
    suite = image_suite(model, 16, seed=0)
    pixels = batch_inputs(suite)["pixel_values"]
    with torch.no_grad():
        clean = model(pixel_values=pixels).logits.argmax(-1)
    assert [item.label for item in suite.items] == clean.tolist()
    table = run_analysis(get_analysis("ablation-sweep"), attnscope.load(model), suite,
                         {"mode": "rescale", "scale": 10.0}, offered={"batch_size": 16})
    assert set(table.df.metric) == {"classification_accuracy"} and (table.df.clean == 1.0).all()
    d = cfg.hidden_size // cfg.num_attention_heads
    for row in table.df.itertuples():
        projection = model.vit.layers[row.layer].attention.o_proj
        hook = projection.register_forward_pre_hook(
            lambda m, args, h=row.head: (args[0] * torch.cat([torch.ones(h * d), torch.full((d,), 10.0),
                                                               torch.ones(args[0].shape[-1] - (h + 1) * d)]),))
        try:
            with torch.no_grad():
                kept = (model(pixel_values=pixels).logits.argmax(-1) == clean).double().mean()
        finally:
            hook.remove()
        assert row.value == pytest.approx(float(kept), abs=1e-9)
    assert table.df.value.min() < 0.5 and table.df.value.max() == 1.0
