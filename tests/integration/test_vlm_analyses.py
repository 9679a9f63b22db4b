"""VLM attention analyses on a tiny random-init LLaVA: visual heads, visual sinks + VAR, FasterVLM pruning, VHD,
and Chefer relevance on the patch grid. References are transcriptions from HF eager ``output_attentions``, plain
forward hooks and autograd; planted heads and tokens give analytic cases."""

import copy

import numpy as np
import pytest
import torch

from attnscope.circuits import registry
from attnscope.circuits.relevance_propagation import relevance
from attnscope.circuits.var_intervention import VARSettings, redistribute, visual_attention_redistribution
from attnscope.circuits.vision_head_divergence import text_only_inputs, vhr_plan, vision_divergence
from attnscope.circuits.visual_head_scores import top_visual_heads, visual_heads
from attnscope.circuits.visual_sink_tokens import find_sink_dims, visual_sinks
from attnscope.circuits.cls_token_pruning import (cls_patch_scores, feature_layers, keep_indices, pruned_logits,
                                                     visual_token_pruning)
from attnscope.datasets.vlm_example_batches import VLMExample, vlm_examples
from attnscope.errors import InputError
from attnscope.probes.adapters import hf_route
from attnscope.probes.adapters.hf_vlm import HFVisionLanguageAdapter, tiny_llava
from attnscope.probes.interventions import apply_plan

IMG, BOS, N_IMG, D_HEAD = 63, 2, 16, 8
PLANTED = (0, 1)  # (layer, head) that attends only to BOS after planting
D_SINK, D_CONST = 0, 1


@pytest.fixture(scope="module")
def llava():
    return tiny_llava()


def make_examples(n=2, seed=0, target=True):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        before = torch.randint(4, 60, (1 + i,), generator=gen)
        after = torch.randint(4, 60, (3 + i,), generator=gen)
        ids = torch.cat([torch.tensor([BOS]), before, torch.full((N_IMG,), IMG), after])
        mask = torch.zeros(4, 4, dtype=torch.bool)
        mask[i:i + 2, 1:3] = True
        out.append(VLMExample(ids, torch.randn(1, 3, 16, 16, generator=gen), answer_id=int(after[0]),
                              target_patches=mask if target else None))
    return out


def planted(model):
    """A copy whose layer-0 head 1 puts all its text-query attention on BOS (the RoPE pair of lowest frequency
    carries the scores), and whose BOS has a massive value in dimension D_SINK."""
    m = copy.deepcopy(model)
    lm = m.model.language_model
    with torch.no_grad():
        emb = lm.embed_tokens.weight
        emb[:, D_SINK] = 0.0
        emb[:, D_CONST] = 5.0
        emb[BOS, D_SINK] = 50.0
        proj = m.model.multi_modal_projector.linear_2
        proj.weight[[D_SINK, D_CONST]] = 0.0
        proj.bias[[D_SINK, D_CONST]] = 0.0
        attn = lm.layers[0].self_attn
        layer, head = PLANTED
        kv = head // 2
        attn.k_proj.weight[kv * D_HEAD:(kv + 1) * D_HEAD] = 0.0
        attn.k_proj.weight[kv * D_HEAD + 3, D_SINK] = 10.0
        attn.q_proj.weight[head * D_HEAD:(head + 1) * D_HEAD] = 0.0
        attn.q_proj.weight[head * D_HEAD + 3, D_CONST] = 1.0
    return m


def eager_attentions(model, inputs):
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(**inputs, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    return [a[0].double() for a in out.attentions]  # per layer [head, query, key]


def test_registered_as_model_analyses():
    for name in ("visual-heads", "visual-sinks", "visual-token-pruning", "vision-divergence"):
        assert registry.get_analysis(name).takes == "model"


def test_examples_from_a_padded_batch(llava):
    inputs = HFVisionLanguageAdapter(llava).sample_inputs()
    items = vlm_examples(inputs)
    assert [len(e.input_ids) for e in items] == [22, 20]
    assert torch.equal(items[1].input_ids, inputs["input_ids"][1, :20])
    with pytest.raises(InputError):
        vlm_examples({"input_ids": inputs["input_ids"]})


# ---- visual heads ---------------------------------------------------------------------------------------------------

def _reference_visual(model, examples, last_only=False):
    """Plain loops over eager attentions: visual mass, target/other densities per (layer, head)."""
    mass, on, off = {}, {}, {}
    for ex in examples:
        ids = ex.input_ids.tolist()
        image = [i for i, t in enumerate(ids) if t == IMG]
        queries = [len(ids) - 1] if last_only else list(range(image[-1] + 1, len(ids)))
        target = [image[j] for j in range(N_IMG) if ex.target_patches.reshape(-1)[j]]
        other = [p for p in image if p not in target]
        for layer, a in enumerate(eager_attentions(model, ex.inputs())):
            for h in range(a.shape[0]):
                rows = a[h, queries]
                mass.setdefault((layer, h), []).append(float(rows[:, image].sum(-1).mean()))
                on.setdefault((layer, h), []).append(float(rows[:, target].sum(-1).mean()) / len(target))
                off.setdefault((layer, h), []).append(float(rows[:, other].sum(-1).mean()) / len(other))
    return mass, on, off


@pytest.mark.parametrize("queries", ["after_image", "last"])
def test_visual_mass_and_target_contrast_equal_eager_reference(llava, queries):
    examples = make_examples()
    table = visual_heads(llava, examples, queries=queries)
    mass, on, off = _reference_visual(llava, examples, last_only=queries == "last")
    df = table.df
    for (layer, h), values in mass.items():
        row = df[(df.layer == layer) & (df["head"] == h)]
        value = lambda m: float(row[row.metric == m].value.iloc[0])  # noqa: E731
        assert value("visual_mass") == pytest.approx(np.mean(values), abs=1e-5)
        assert value("target_ratio") == pytest.approx(np.mean(on[(layer, h)]) / np.mean(off[(layer, h)]), rel=1e-4)
        diff = np.mean(np.array(on[(layer, h)]) - np.array(off[(layer, h)]))
        assert value("target_minus_other") == pytest.approx(diff, abs=1e-6)
    assert table.provenance["main_metric"] == "visual_mass"


def test_planted_bos_head_has_no_visual_mass_and_ranks_last(llava):
    model = planted(llava)
    table = visual_heads(model, make_examples(target=False))
    df = table.df[table.df.metric == "visual_mass"]
    row = df[(df.layer == PLANTED[0]) & (df["head"] == PLANTED[1])]
    assert float(row.value.iloc[0]) < 1e-6 and int(row["rank"].iloc[0]) == len(df)
    assert (df[(df.layer != PLANTED[0]) | (df["head"] != PLANTED[1])].value > 0.1).all()
    ranking = top_visual_heads(table, k=len(df))
    assert ranking[-1] == PLANTED and ranking == [tuple(x) for x in
                                                  df.sort_values("value", ascending=False)[["layer", "head"]].values]
    assert "target_ratio" not in set(table.df.metric)


# ---- visual sinks and VAR ----------------------------------------------------------------------------------------

SINK_PATCH = 5


@pytest.fixture()
def sink_model(llava):
    """The planted model, with image token SINK_PATCH given a massive value in D_SINK (a projector hook)."""
    model = planted(llava)

    def hook(module, args, output):
        output = output.clone()
        output[:, SINK_PATCH, D_SINK] = 50.0
        return output
    handle = model.model.multi_modal_projector.register_forward_hook(hook)
    yield model
    handle.remove()


def test_planted_visual_sink_is_found(sink_model):
    examples = make_examples(target=False)
    assert [d for d, _ in find_sink_dims(sink_model, examples, n_dims=1)] == [D_SINK]
    table = visual_sinks(sink_model, examples, n_sink_dims=1, tau=4.0)
    df = table.df
    tokens = df[df.metric == "visual_sink_token"]
    assert sorted(set(tokens.patch)) == [SINK_PATCH] and len(tokens) == 2 * 2  # 2 examples x 2 layers
    first_image = [int(e.input_ids.tolist().index(IMG)) for e in examples]
    assert sorted(set(tokens.position)) == sorted({p + SINK_PATCH for p in first_image})
    assert (df[df.metric == "visual_sink_count"].value == 1.0).all()
    assert (df[df.metric == "text_sink_count"].value >= 1.0).all()  # BOS
    # per-head sink attention equals the eager attention to the planted token, queries after the image
    for layer in range(2):
        expected = []
        for ex in examples:
            ids = ex.input_ids.tolist()
            sink_pos = ids.index(IMG) + SINK_PATCH
            a = eager_attentions(sink_model, ex.inputs())[layer]
            expected.append(a[:, ids.index(IMG) + N_IMG:, sink_pos].mean(-1))
        got = df[(df.metric == "visual_sink_attention") & (df.layer == layer)].sort_values("head").value.values
        np.testing.assert_allclose(got, torch.stack(expected).mean(0).numpy(), atol=1e-5)


def test_no_sinks_in_a_plain_tiny_model_at_paper_tau(llava):
    table = visual_sinks(llava, make_examples(), tau=20.0, sink_dims=[3, 7])
    assert (table.df[table.df.metric == "visual_sink_count"].value == 0).all()
    assert table.provenance["sink_dims"] == [3, 7]


def test_redistribute_moves_exactly_one_minus_p_of_sink_mass():
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(3, 5, 10, generator=gen).softmax(-1)
    sink = torch.zeros(10, dtype=torch.bool)
    sink[[0, 4]] = True
    visual = torch.zeros(10, dtype=torch.bool)
    visual[3:8] = True
    select = torch.rand(3, 5, generator=gen) > 0.4
    out = redistribute(probs, sink.expand_as(probs), visual.expand_as(probs), select, p=0.6)
    torch.testing.assert_close(out.sum(-1), torch.ones(3, 5))
    s, t = probs[select], out[select]
    torch.testing.assert_close(t[:, sink], 0.6 * s[:, sink])
    moved = 0.4 * s[:, sink].sum(-1)
    targets = visual & ~sink
    torch.testing.assert_close((t - s)[:, targets].sum(-1), moved)
    torch.testing.assert_close((t - s)[:, targets], moved[:, None] * s[:, targets] / s[:, targets].sum(-1,
                                                                                                    keepdim=True))
    torch.testing.assert_close(t[:, ~(visual | sink)], s[:, ~(visual | sink)])
    assert torch.equal(out[~select], probs[~select])


def _o_proj_input_and_values(model, inputs, layer=0):
    seen = {}
    attn = model.model.language_model.layers[layer].self_attn
    h1 = attn.o_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("z", a[0][0].detach()))
    h2 = attn.v_proj.register_forward_hook(lambda m, a, o: seen.__setitem__("v", o[0].detach()))
    try:
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1]
    finally:
        h1.remove()
        h2.remove()
    return logits, seen["z"], seen["v"]


def test_var_edits_image_centric_rows_and_restores(sink_model):
    ex = make_examples(target=False)[1]
    settings = VARSettings([D_SINK], tau=4.0, p=0.6)
    base, _, _ = _o_proj_input_and_values(sink_model, ex.inputs())
    record = {}
    with visual_attention_redistribution(sink_model, settings, record=record):
        logits, z, v = _o_proj_input_and_values(sink_model, ex.inputs())
    assert sorted(record) == [0]  # the last layer (1) is skipped
    rec = record[0]
    probs, edited, selected, sinks = rec["probs"][0], rec["edited"][0], rec["selected"][0], rec["sinks"][0]
    ids = ex.input_ids.tolist()
    first = ids.index(IMG)
    assert sinks.nonzero().flatten().tolist() == [0, first + SINK_PATCH]  # BOS (text sink) and the planted token
    assert selected.any() and not selected[:, :first + N_IMG].any()  # only text queries after the image
    assert not selected[PLANTED[1]].any()  # the BOS head has no visual attention
    torch.testing.assert_close(edited.sum(-1), torch.ones_like(edited.sum(-1)))
    p, e = probs[selected], edited[selected]
    torch.testing.assert_close(e[:, sinks], 0.6 * p[:, sinks])
    visual = torch.tensor(ids) == IMG
    torch.testing.assert_close((e - p)[:, visual & ~sinks].sum(-1), 0.4 * p[:, sinks].sum(-1))
    # the edited rows' head outputs are edited probabilities times the values (GQA: 2 query heads per KV head)
    values = v.reshape(len(ids), 2, D_HEAD)
    for h in range(4):
        rows = selected[h].nonzero().flatten()
        if len(rows):
            expected = edited[h, rows] @ values[:, h // 2].float()
            torch.testing.assert_close(z[rows, h * D_HEAD:(h + 1) * D_HEAD], expected, atol=1e-5, rtol=1e-4)
    assert (logits - base).abs().max() > 1e-4
    assert not hf_route._ACTIVE and sink_model.config.text_config._attn_implementation == "sdpa"
    with visual_attention_redistribution(sink_model, VARSettings([D_SINK], tau=4.0, p=1.0)):
        same, _, _ = _o_proj_input_and_values(sink_model, ex.inputs())
    torch.testing.assert_close(same, base, atol=1e-5, rtol=0)


def test_visual_sinks_table_with_var(sink_model):
    table = visual_sinks(sink_model, make_examples(target=False), sink_dims=[D_SINK], tau=4.0, var=True)
    df = table.df
    assert set(df[df.layer == -1].metric) >= {"var_top1_agreement", "var_max_logit_change", "var_answer_prob_delta"}
    assert list(df[df.metric == "var_selected_fraction"].layer) == [0]
    assert float(df[df.metric == "var_max_logit_change"].value.iloc[0]) > 0


# ---- FasterVLM pruning ------------------------------------------------------------------------------------------

def test_cls_ranking_equals_argsort_of_eager_cls_attention(llava):
    ex = make_examples()[0]
    llava.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = llava.model.vision_tower(ex.pixel_values, output_attentions=True)
    finally:
        llava.set_attn_implementation("sdpa")
    cls = out.attentions[-1][0, :, 0, 1:].mean(0)  # vision_feature_layer=-1: the last layer's output
    scores = cls_patch_scores(llava, ex)
    torch.testing.assert_close(scores, cls, atol=1e-6, rtol=0)
    keep = keep_indices(scores, 0.25)
    assert keep.tolist() == sorted(torch.argsort(cls, descending=True)[:4].tolist())
    assert keep_indices(scores, 0.01).numel() == 1 and keep_indices(scores, 0.0).numel() == 0


def test_feature_layer_mapping(llava):
    original = llava.config.vision_feature_layer
    adapter = HFVisionLanguageAdapter(llava)
    try:
        for value, expected in ((-1, [1]), (-2, [0]), (2, [1]), ([-2, -1], [0, 1])):
            llava.config.vision_feature_layer = value
            assert feature_layers(adapter) == expected
    finally:
        llava.config.vision_feature_layer = original


def test_full_ratio_reproduces_unpruned_logits_and_pruning_equals_masking(llava):
    ex = make_examples()[1]
    with torch.no_grad():
        full = llava(**ex.inputs()).logits[0]
    torch.testing.assert_close(pruned_logits(llava, ex, torch.arange(N_IMG)), full, atol=1e-5, rtol=0)
    # with the original positions, dropping image tokens equals masking them as keys
    keep = torch.tensor([1, 4, 9, 15])
    ids = ex.input_ids.tolist()
    first = ids.index(IMG)
    mask = torch.ones(1, len(ids), dtype=torch.long)
    mask[0, [first + i for i in range(N_IMG) if i not in keep.tolist()]] = 0
    with torch.no_grad():
        masked = llava(**dict(ex.inputs(), attention_mask=mask)).logits[0, -1]
    torch.testing.assert_close(pruned_logits(llava, ex, keep, original_positions=True)[-1], masked,
                               atol=1e-5, rtol=0)


def test_keep_ratio_curve(llava):
    examples = make_examples()

    def answer_rank(logits, example):
        return float((logits > logits[example.answer_id]).sum())

    table = visual_token_pruning(llava, examples, ratios=(1.0, 0.5, 0.0625), n_random=2, metric=answer_rank)
    df = table.df
    at_full = df[df.ratio == 1.0]
    assert (at_full[at_full.metric == "top1_agreement"].value == 1.0).all()
    assert (at_full[at_full.metric == "kl_to_full"].value.abs() < 1e-6).all()
    assert set(df.selection) == {"cls", "random"}
    assert dict(zip(df[df.selection == "cls"].ratio, df[df.selection == "cls"].n_kept)) == {1.0: 16, 0.5: 8,
                                                                                           0.0625: 1}
    assert {"answer_accuracy", "answer_prob", "metric:answer_rank"} <= set(df.metric)
    assert (df[df.metric == "kl_to_full"].value >= -1e-7).all()


# ---- vision-aware head divergence ----------------------------------------------------------------------------------

def _reference_vhd(model, inputs_a, inputs_b):
    outs = []
    for inputs in (inputs_a, inputs_b):
        seen = []
        hooks = [layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0][0, -1]))
                 for layer in model.model.language_model.layers]
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            for h in hooks:
                h.remove()
        outs.append(torch.stack(seen).reshape(len(seen), 4, D_HEAD))
    return (outs[0] - outs[1]).norm(dim=-1)


@pytest.mark.parametrize("baseline", ["drop", "blank"])
def test_vhd_is_zero_for_an_image_blind_head_and_matches_hooks(llava, baseline):
    model = planted(llava)
    examples = make_examples(target=False)
    table = vision_divergence(model, examples, baseline=baseline)
    vhd = table.df[table.df.metric == "vhd"]
    planted_row = vhd[(vhd.layer == PLANTED[0]) & (vhd["head"] == PLANTED[1])]
    assert float(planted_row.value.iloc[0]) < 1e-5 and int(planted_row["rank"].iloc[0]) == len(vhd)
    assert (vhd[(vhd.layer != PLANTED[0]) | (vhd["head"] != PLANTED[1])].value > 1e-3).all()
    reference = torch.stack([_reference_vhd(model, ex.inputs(), text_only_inputs(ex, HFVisionLanguageAdapter(model),
                                                                                 baseline)) for ex in examples])
    got = vhd.sort_values(["layer", "head"]).value.values
    np.testing.assert_allclose(got, reference.mean(0).flatten().numpy(), atol=1e-5)


def test_text_only_inputs_drop_the_image():
    ex = make_examples()[0]
    adapter = HFVisionLanguageAdapter(tiny_llava())
    dropped = text_only_inputs(ex, adapter, "drop")
    assert "pixel_values" not in dropped and IMG not in dropped["input_ids"].tolist()
    assert dropped["input_ids"].shape[1] == len(ex.input_ids) - N_IMG


def test_vhr_rescale_plan_on_the_language_model(llava):
    from attnscope.circuits._vlm import language_model

    ex = make_examples()[0]
    table = vision_divergence(llava, [ex])
    plan = vhr_plan(table, top_k=1, scale=1.0)
    with torch.no_grad():
        base = llava(**ex.inputs()).logits
        with apply_plan(language_model(llava), plan):
            same = llava(**ex.inputs()).logits
        (layer, head), = list(plan.heads)
        zero = vhr_plan(table, top_k=1, scale=0.0)
        with apply_plan(language_model(llava), zero):
            ablated = llava(**ex.inputs()).logits
        surgery = copy.deepcopy(llava)
        surgery.model.language_model.layers[layer].self_attn.o_proj.weight[:, head * D_HEAD:(head + 1) * D_HEAD] = 0
        expected = surgery(**ex.inputs()).logits
    assert torch.equal(same, base)
    torch.testing.assert_close(ablated, expected, atol=1e-5, rtol=0)
    assert (ablated - base).abs().max() > 1e-5


# ---- relevance on the patch grid ------------------------------------------------------------------------------------

def test_relevance_image_map_matches_autograd_reference(llava):
    ex = make_examples()[0]
    result = relevance(llava, ex.inputs(), target=7)
    llava.set_attn_implementation("eager")
    try:
        out = llava(**ex.inputs(), output_attentions=True)
        grads = torch.autograd.grad(out.logits[0, -1, 7], out.attentions)
    finally:
        llava.set_attn_implementation("sdpa")
    n = len(ex.input_ids)
    r = np.eye(n)
    for a, g in zip(out.attentions, grads):
        r = r + np.clip(g[0].double().numpy() * a[0].detach().double().numpy(), 0, None).mean(0) @ r
    np.testing.assert_allclose(result.matrix.numpy(), r, atol=1e-5)
    first = ex.input_ids.tolist().index(IMG)
    assert result.image_map.shape == (4, 4)
    np.testing.assert_allclose(result.image_map.flatten().numpy(), r[-1, first:first + N_IMG], atol=1e-5)


def test_dimension_annotations_hold():
    from beartype import beartype
    from jaxtyping import jaxtyped

    from attnscope.circuits.var_intervention import image_centric, sink_phi
    from attnscope.circuits.vision_head_divergence import head_divergence
    from attnscope.circuits.visual_head_scores import head_target_mass, head_visual_mass

    def check(fn):
        return jaxtyped(typechecker=beartype)(fn)

    probs = torch.rand(2, 3, 6).softmax(-1)
    sink, visual = torch.zeros(2, 3, 6, dtype=torch.bool), torch.ones(2, 3, 6, dtype=torch.bool)
    assert check(redistribute)(probs, sink, visual, torch.ones(2, 3, dtype=torch.bool)).shape == (2, 3, 6)
    assert check(image_centric)(probs, sink, visual).shape == (2, 3)
    assert check(sink_phi)(torch.randn(1, 5, 8), [0, 3]).shape == (1, 5)
    assert check(head_visual_mass)(probs, [4, 5, 5], [1, 2])["visual_mass"].shape == (2,)
    assert check(head_target_mass)(probs, [1, 2, 3], torch.tensor([True, False, False]))["target_mass"].shape == (2,)
    assert check(head_divergence)(torch.randn(2, 4, 8), torch.randn(2, 4, 8)).shape == (2, 4)
    assert check(keep_indices)(torch.rand(16), 0.5).shape == (8,)
    with pytest.raises(Exception):
        check(head_divergence)(torch.randn(2, 4, 8), torch.randn(2, 3, 8))


def test_full_strategy_keeps_cls_token_and_maps_patches_after_it():
    model = tiny_llava()
    model.config.vision_feature_select_strategy = "full"  # image tokens: CLS + 16 patches
    ids = torch.tensor([BOS, 5] + [IMG] * (N_IMG + 1) + [6, 7, 8])
    mask = torch.zeros(N_IMG, dtype=torch.bool)
    mask[[0, 5]] = True
    ex = VLMExample(ids, torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3)),
                    target_patches=mask)
    keep = torch.tensor([2, 11])
    attention_mask = torch.ones(1, len(ids), dtype=torch.long)
    attention_mask[0, [2 + 1 + i for i in range(N_IMG) if i not in keep.tolist()]] = 0  # CLS (position 2) kept
    with torch.no_grad():
        masked = model(**dict(ex.inputs(), attention_mask=attention_mask)).logits[0, -1]
    pruned = pruned_logits(model, ex, keep, original_positions=True)
    assert pruned.shape[0] == len(ids) - N_IMG + 2
    torch.testing.assert_close(pruned[-1], masked, atol=1e-5, rtol=0)
    table = visual_heads(model, [ex], queries="last")
    a = eager_attentions(model, ex.inputs())[1][:, -1]  # layer 1, last query: [head, key]
    target = a[:, [3 + 0, 3 + 5]].sum(-1)
    got = table.df[(table.df.metric == "target_mass") & (table.df.layer == 1)].sort_values("head").value.values
    np.testing.assert_allclose(got, target.numpy(), atol=1e-5)


def test_relevance_image_map_skips_the_cls_token_of_the_full_strategy():
    model = tiny_llava()
    model.config.vision_feature_select_strategy = "full"
    ids = torch.tensor([BOS, 5] + [IMG] * (N_IMG + 1) + [6, 7])
    result = relevance(model, VLMExample(ids, torch.randn(1, 3, 16, 16)).inputs(), target=3)
    assert result.image_map.shape == (4, 4)
    torch.testing.assert_close(result.image_map.flatten(), result.row[3:3 + N_IMG])


def test_bad_inputs_raise_named_errors(llava):
    from tiny_models import tiny_text_model

    from attnscope.errors import AnalysisError

    examples = make_examples()
    with pytest.raises(AnalysisError, match="vision-language"):
        visual_heads(tiny_text_model("llama"), examples)
    with pytest.raises(InputError, match="query selection"):
        visual_heads(llava, examples, queries="middle")
    with pytest.raises(InputError, match="patch grid"):
        visual_heads(llava, [VLMExample(examples[0].input_ids, examples[0].pixel_values,
                                        target_patches=torch.ones(3, 3))])
    with pytest.raises(InputError, match="keep ratio"):
        visual_token_pruning(llava, examples, ratios=(1.5,))
    with pytest.raises(InputError, match="baseline"):
        vision_divergence(llava, examples, baseline="noise")
    with pytest.raises(InputError, match="p out of range"):
        VARSettings([0], p=1.5)
    with pytest.raises(InputError, match="no image tokens"):
        visual_heads(llava, [VLMExample(torch.tensor([2, 5, 6]), examples[0].pixel_values)])
