"""The existing analyses, run unchanged (task layer, public functions) on one newly supported family of each kind:
a vision encoder (ViT), an encoder-decoder (BART), a modern VLM (Idefics3) and Flux (denoiser and tiny pipeline).

Token-suite analyses (detectors, head-stats, sinks, importance, the ablation sweep, pruning, sweep cells) run on
the families that read token ids and are checked against references written here: numpy over the model's own
eager attentions, plain forward pre-hooks that zero one head's slice of the output-projection input, and
autograd through gates of those slices. Given a token suite, the families that cannot read token ids raise one
``InputError`` with expected / got / fix before anything runs; the same analyses on their own inputs (the
``images`` and ``latents`` suites) are checked in ``test_analyses_on_images_and_latents.py``, and the dashboard's
ablation of a ViT and a Flux pipeline in ``test_live_ablation_media.py``.
"""

import copy
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import transformers

import attnscope
from attnscope.circuits.structural import prune_heads_structurally
from attnscope.circuits.task_metrics import AnswerLoss, eval_batches, evaluate, metric_for
from attnscope.datasets import induction
from attnscope.errors import AnalysisError, InputError, UnsupportedModelError
from attnscope.probes.coverage import ARCHITECTURES
from attnscope.probes.heads import HeadSet
from attnscope.probes.tower_heads import resolve_heads
from attnscope.sweeps.cells import run_cell
from attnscope.sweeps.spec import parse_spec
from attnscope.tasks.analyses import get_analysis, run_analysis
from attnscope.tasks.suites import build_suite

TOKEN_FAMILIES = ("bart", "idefics3")  # encoder-decoder, VLM (text-only prompts)
NO_TOKENS = ("vit", "flux")  # vision encoder, Flux denoiser
TOWER = {"bart": "encoder", "idefics3": "text"}  # the self-attention tower the suite's ids feed
N_HEADS = 4
SUITE_ARGS = dict(seq_len=10, vocab_size=60, first_token=4)  # ids below every tiny VLM's special image ids


@pytest.fixture(scope="module")
def models():
    return {name: ARCHITECTURES[name].builder() for name in TOKEN_FAMILIES + NO_TOKENS}


def suite():
    return induction(3, seed=0, **SUITE_ARGS)


def out_projections(model, name):
    """Reference: the self-attention output projections in the order attnscope numbers layers (encoder first)."""
    if name == "bart":
        stacks = [model.model.encoder.layers, model.model.decoder.layers]
        return [layer.self_attn.out_proj for stack in stacks for layer in stack]
    return [layer.self_attn.o_proj for layer in model.model.text_model.layers]


@contextmanager
def zeroed(model, name, heads):
    """Zero heads' slices of the output-projection input with plain forward pre-hooks."""
    projections = out_projections(model, name)

    def hook_for(head_ids):
        def hook(module, args):
            x = args[0].clone()
            d = x.shape[-1] // N_HEADS
            for h in head_ids:
                x[..., h * d:(h + 1) * d] = 0
            return (x,) + args[1:]
        return hook
    by_layer = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    handles = [projections[layer].register_forward_pre_hook(hook_for(hs)) for layer, hs in by_layer.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def eager_patterns(model, name, ids):
    """The model's own eager attentions of the suite's tower, one item: ``[layer, head, query, key]``."""
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    attentions = out.encoder_attentions if name == "bart" else out.attentions
    return np.stack([a[0].double().numpy() for a in attentions])


def numpy_score(pattern, template):
    """``sum(A * P) / sum(A)`` over the template's active rows (the detectors' ``rows`` normalisation)."""
    active = template.sum(-1) > 0
    a, p = pattern[..., active, :], template[active]
    return (a * p).sum((-1, -2)) / a.sum((-1, -2))


def templates(ids, span):
    ids = np.array(ids)
    n = len(ids)
    prev = np.eye(n, k=-1)
    dup = np.tril(ids[:, None] == ids[None, :], k=-1).astype(float)
    ind = np.zeros((n, n))
    ind[:, 1:] = dup[:, :-1]
    ind = np.tril(ind)
    ind[:span[0]] = 0
    ind[span[1]:] = 0
    return {"prev-token": prev, "duplicate": dup, "induction": ind}


def table_array(table, metric="score", layers=None):
    df = table.df[table.df.metric == metric]
    layers = layers or sorted(set(df.layer))
    out = np.zeros((len(layers), N_HEADS))
    for row in df.itertuples():
        out[layers.index(row.layer), row.head] = row.value
    return out


# ---- detectors and head statistics ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", TOKEN_FAMILIES)
def test_detectors_equal_numpy_on_the_models_eager_patterns(models, name):
    model, prompts = models[name], suite()
    handle = attnscope.load(model)
    expected = {a: [] for a in ("prev-token", "duplicate", "induction")}
    for item in prompts:
        pattern = eager_patterns(model, name, item.ids)
        for analysis, template in templates(item.ids, item.metadata["repeat_span"]).items():
            expected[analysis].append(numpy_score(pattern, template))
    for analysis, values in expected.items():
        table = run_analysis(get_analysis(analysis), handle, prompts, {"tower": TOWER[name]},
                             offered={"batch_size": 2, "progress": False})
        np.testing.assert_allclose(table_array(table), np.mean(values, 0), atol=1e-5)
    assert np.mean(expected["prev-token"]) > 0  # attention is not degenerate


def test_encoder_decoder_without_a_tower_names_the_towers_to_pick(models):
    with pytest.raises(AnalysisError) as info:
        run_analysis(get_analysis("prev-token"), attnscope.load(models["bart"]), suite(), {},
                     offered={"progress": False})
    assert "encoder" in info.value.fix and "decoder" in info.value.fix


@pytest.mark.parametrize("name", TOKEN_FAMILIES)
def test_head_stats_equal_numpy_sink_mass_and_entropy(models, name):
    model, prompts = models[name], suite()
    table = run_analysis(get_analysis("head-stats"), attnscope.load(model), prompts, {"tower": TOWER[name]},
                         offered={"batch_size": 2})
    patterns = np.concatenate([eager_patterns(model, name, item.ids) for item in prompts], 2)  # queries joined
    np.testing.assert_allclose(table_array(table, "sink_mass"), patterns[..., 0].mean(-1), atol=1e-5)
    entropy = -(patterns * np.log(np.clip(patterns, 1e-30, None))).sum(-1).mean(-1)
    np.testing.assert_allclose(table_array(table, "entropy"), entropy, atol=1e-4)


# ---- ablation sweep, importance, pruning -----------------------------------------------------------------------


def reference_loss(model, name, heads=()):
    with torch.no_grad(), zeroed(model, name, heads):
        return evaluate(model, eval_batches(suite(), batch_size=2), AnswerLoss())


@pytest.mark.parametrize("name", TOKEN_FAMILIES)
def test_ablation_sweep_rows_equal_plain_hook_ablations(models, name):
    model = models[name]
    table = run_analysis(get_analysis("ablation-sweep"), attnscope.load(model), suite(), {"metric": "loss"},
                         offered={"batch_size": 2})
    n_layers = len(out_projections(model, name))
    assert len(table) == n_layers * N_HEADS
    clean = reference_loss(model, name)
    towers = {"bart": {"encoder", "decoder"}, "idefics3": {"text"}}[name]  # idefics3: text-only prompts
    assert {name.split(".")[0] for name in table.df.tower_head} == towers
    for row in table.df.itertuples():
        assert resolve_heads(row.tower_head, model) == HeadSet([(row.layer, row.head)])
        assert row.clean == pytest.approx(clean, abs=1e-5)
        assert row.value == pytest.approx(reference_loss(model, name, [(row.layer, row.head)]), abs=1e-5)
    assert table.df.delta.abs().max() > 1e-4


def gated_importance(model, name):
    """Reference: |d loss / d gate| with a gate of ones on every head slice (autograd through plain hooks)."""
    projections = out_projections(model, name)
    gates = torch.ones(len(projections), N_HEADS, requires_grad=True)

    def hook_for(layer):
        def hook(module, args):
            x = args[0]
            d = x.shape[-1] // N_HEADS
            scale = gates[layer].repeat_interleave(d).to(x.dtype)
            return (x * scale,) + args[1:]
        return hook
    handles = [p.register_forward_pre_hook(hook_for(i)) for i, p in enumerate(projections)]
    try:
        batch = eval_batches(suite(), batch_size=3)[0]
        decoder = {"decoder_input_ids": batch.input_ids, "decoder_attention_mask": batch.attention_mask} \
            if name == "bart" else {}  # the decoder reads the same ids: logits at t predict token t + 1
        out = model(**batch.inputs, **decoder)
        loss = AnswerLoss().item_stats(out, batch)
        (loss[:, 0] / loss[:, 1]).mean().backward()
    finally:
        for handle in handles:
            handle.remove()
    return gates.grad.abs()


@pytest.mark.parametrize("name", TOKEN_FAMILIES)
def test_importance_equals_autograd_through_plain_head_gates(models, name):
    model = models[name]
    table = run_analysis(get_analysis("importance"), attnscope.load(model), suite(),
                         {"metric": "loss", "variant": "abs_of_sum", "normalize_layers": False},
                         offered={"batch_size": 3})
    expected = gated_importance(model, name).numpy()
    got = table_array(table, "importance_raw", layers=list(range(len(expected))))
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-6)
    assert expected.max() > 1e-4


def test_structural_pruning_of_the_vlm_equals_zero_ablation(models):
    model = models["idefics3"]
    heads = [(0, 1), (1, 2)]
    ids = torch.tensor([item.ids for item in suite()])
    with torch.no_grad(), zeroed(model, "idefics3", heads):
        expected = model(input_ids=ids).logits
    pruned = copy.deepcopy(model)
    prune_heads_structurally(pruned, HeadSet(heads))
    with torch.no_grad():
        torch.testing.assert_close(pruned(input_ids=ids).logits, expected, atol=1e-5, rtol=0)


def test_structural_pruning_refuses_the_encoder_decoder_with_a_fix(models):
    with pytest.raises(UnsupportedModelError) as info:
        prune_heads_structurally(copy.deepcopy(models["bart"]), HeadSet([(0, 1)]))
    assert info.value.expected and info.value.got and info.value.fix


# ---- sweeps --------------------------------------------------------------------------------------------------------


def sweep_cells(folder, analysis="ablation-sweep"):
    spec = {"models": [str(folder)], "suites": [{"generator": "induction", "n_items": 3, **SUITE_ARGS}],
            "analyses": [{"name": analysis, "options": {"metric": "loss", "batch_size": 2}}],
            "interventions": [{"heads": "L0H1", "mode": "zero"}]}
    return parse_spec(spec).cells()


@pytest.mark.parametrize("name", TOKEN_FAMILIES)
def test_sweep_cell_under_an_intervention_equals_hook_ablation(models, name, tmp_path):
    model = models[name]
    model.save_pretrained(tmp_path / name)
    cell, = sweep_cells(tmp_path / name)
    df = run_cell(cell.to_dict(), cache=False)["df"]
    prompts = build_suite(cell.suite.ref, attnscope.load(str(tmp_path / name)))
    assert [item.ids for item in prompts] == [item.ids for item in suite()]  # the same prompts as the reference
    assert float(df.clean.iloc[0]) == pytest.approx(reference_loss(model, name, [(0, 1)]), abs=1e-5)
    row = df[(df.layer == 1) & (df["head"] == 0)]
    assert float(row.value.iloc[0]) == pytest.approx(reference_loss(model, name, [(0, 1), (1, 0)]), abs=1e-5)


# ---- refusals: models that cannot read token suites ----------------------------------------------------------


def check_error(error):
    assert error.expected and error.got and error.fix


@pytest.mark.parametrize("name", NO_TOKENS)
def test_token_suite_analyses_refuse_with_expected_got_fix(models, name, tmp_path):
    handle = attnscope.load(models[name])
    for analysis in ("prev-token", "induction", "duplicate", "sinks", "head-stats", "importance",
                     "ablation-sweep"):
        with pytest.raises(InputError, match="cannot read") as info:
            run_analysis(get_analysis(analysis), handle, suite(), {}, offered={"progress": False})
        check_error(info.value)
    with pytest.raises(InputError, match="cannot read") as info:  # what pruning (attnscope prune) evaluates with
        metric_for(handle, suite())
    check_error(info.value)
    models[name].save_pretrained(tmp_path / name)
    cell, = sweep_cells(tmp_path / name)
    with pytest.raises(InputError, match="cannot read"):
        run_cell(cell.to_dict(), cache=False)


# ---- dashboard ablation --------------------------------------------------------------------------------------------


def test_dashboard_live_ablation_on_the_vlm_equals_hook_ablation(models):
    from attnscope.dashboards.live_ablation import ablate, total_variation
    from attnscope.dashboards.live_state import _capture

    model = models["idefics3"]
    handle = attnscope.load(model)
    ids = suite()[0].ids
    cap = _capture(handle, {"input_ids": torch.tensor([ids])}, "tiny-idefics3")  # the live page's capture helper
    clean = eager_patterns(model, "idefics3", ids)
    np.testing.assert_allclose(cap.attn(), clean, atol=1e-5)
    result = ablate(handle, cap, "L0H1", "zero")
    with zeroed(model, "idefics3", [(0, 1)]):
        after = eager_patterns(model, "idefics3", ids)
    np.testing.assert_allclose(result.attn_after, after, atol=1e-5)
    np.testing.assert_allclose(result.change, total_variation(clean, after), atol=1e-5)
    assert not result.change[0].any() and result.change[1].max() > 1e-4  # only later layers move


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_encoder_decoder_metric_scores_the_next_token_of_the_decoders_own_input(family):
    """The suites' targets are the next token (``targets[t] = ids[t + 1]``). An encoder-decoder is run with its
    decoder reading the same ids, so the loss the analyses see equals cross-entropy of ``logits[t]`` against
    ``ids[t + 1]`` computed here by hand (BART would otherwise shift the ids right: one position off; T5 would not
    run at all)."""
    import torch.nn.functional as F

    from attnscope.circuits.task_metrics import AnswerLoss, eval_batches, metric_totals

    torch.manual_seed(0)
    if family == "bart":
        cfg = transformers.BartConfig(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1,
                                      encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                      decoder_ffn_dim=32, max_position_embeddings=64)
        model = transformers.BartForConditionalGeneration(cfg).eval()
    else:
        cfg = transformers.T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
        model = transformers.T5ForConditionalGeneration(cfg).eval()
    batches = eval_batches(suite(), batch_size=8)
    got = AnswerLoss().reduce(metric_totals(model, batches, AnswerLoss()))
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           decoder_input_ids=batch.input_ids, decoder_attention_mask=batch.attention_mask).logits
            for row, ids in enumerate(batch.input_ids):
                for t in (batch.targets[row] != -100).nonzero().flatten().tolist():
                    assert int(batch.targets[row, t]) == int(ids[t + 1])
                    total += float(F.cross_entropy(logits[row, t].double()[None], ids[t + 1][None]))
                    count += 1
    assert count > 0 and got == pytest.approx(total / count, rel=1e-9)
