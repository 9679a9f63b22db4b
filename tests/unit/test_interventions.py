"""Intervention plans against hand computations on tiny random-init models (GPT-2, Llama/Qwen2/Mistral, BERT).

The oracle of every mode is the layer's output projection applied by hand (``F.linear`` / Conv1D weights) to the
head outputs of a clean eager run with the head's slice edited by hand; uniform attention is recomputed from the
value vectors and the allowed keys (causal, padding, sliding window).
"""

import json

import pytest
import torch
from tiny_models import tiny_text_model

import attnscope
from attnscope.errors import HeadSpecError, InputError
from attnscope.probes.ablation import zero_ablate_heads
from attnscope.probes.adapters import hf_route
from attnscope.probes.head_slices import expand_kv_selection, kv_head_of, output_projections, query_heads_of
from attnscope.probes.heads import HeadSet
from attnscope.probes.interventions import InterventionPlan, apply_plan, mean_plan, resample_plan

D_HEAD = 8  # tiny models: hidden 32, 4 heads


def _inputs(n=10, vocab=64, seed=3):
    ids = torch.randint(4, vocab, (2, n), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return ids, mask


def _peaked(model):
    """Sharpen attention (scale query weights) so uniform attention differs visibly from the model's."""
    with torch.no_grad():
        for p in output_projections(model):
            if p.family == "gpt2":
                p.block.c_attn.weight[:, :32] *= 8
            elif p.family == "llama":
                p.block.q_proj.weight *= 8
            else:
                p.attention.query.weight *= 8
    return model


def _proj_in_out(model, layer, run):
    """(input, output) of layer ``layer``'s output projection during ``run()``."""
    proj = output_projections(model)[layer].module
    seen = {}
    h1 = proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach().clone()))
    h2 = proj.register_forward_hook(lambda m, a, o: seen.__setitem__("y", o.detach().clone()))
    try:
        with torch.no_grad():
            run()
    finally:
        h1.remove()
        h2.remove()
    return seen["x"], seen["y"]


def _apply_proj(model, layer, x):
    """The output projection by hand from its weights."""
    proj = output_projections(model)[layer].module
    if isinstance(proj, torch.nn.Linear):
        return torch.nn.functional.linear(x, proj.weight, proj.bias)
    return x @ proj.weight + proj.bias  # transformers Conv1D: weight [in, out]


def _eager(family):
    return tiny_text_model(family, "eager")


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_zero_mode_equals_zeroed_slice_by_hand(family):
    model, (ids, mask) = _eager(family), _inputs()
    run = lambda: model(input_ids=ids, attention_mask=mask)  # noqa: E731
    z, _ = _proj_in_out(model, 1, run)
    with apply_plan(model, InterventionPlan(HeadSet([(1, 2)]), "zero")):
        _, got = _proj_in_out(model, 1, run)
    z = z.clone()
    z[..., 2 * D_HEAD:3 * D_HEAD] = 0
    torch.testing.assert_close(got, _apply_proj(model, 1, z), atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "bert"])
def test_zero_mode_equals_zeroed_projection_columns(family):
    """Independent mechanism: zero the head's columns of the projection weight instead of hooking."""
    model, (ids, mask) = tiny_text_model(family), _inputs()
    out = lambda m: m(input_ids=ids, attention_mask=mask)[0]  # noqa: E731
    with torch.no_grad(), apply_plan(model, InterventionPlan(HeadSet([(0, 1), (1, 3)]), "zero")):
        got = out(model)
    with torch.no_grad():
        for layer, head in [(0, 1), (1, 3)]:
            proj = output_projections(model)[layer].module
            cols = slice(head * D_HEAD, (head + 1) * D_HEAD)
            if isinstance(proj, torch.nn.Linear):
                proj.weight[:, cols] = 0
            else:
                proj.weight[cols, :] = 0
        want = out(model)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_rescale_one_is_identity_and_zero_equals_zero_mode(family):
    model, (ids, mask) = tiny_text_model(family), _inputs()
    out = lambda: model(input_ids=ids, attention_mask=mask).logits  # noqa: E731
    heads = HeadSet([(0, 0), (1, 2)])
    with torch.no_grad():
        clean = out()
        with apply_plan(model, InterventionPlan(heads, "rescale", scale=1.0)):
            same = out()
        with apply_plan(model, InterventionPlan(heads, "rescale", scale=0.0)):
            scaled0 = out()
        with apply_plan(model, InterventionPlan(heads, "zero")):
            zero = out()
        with apply_plan(model, InterventionPlan(heads, "rescale", scale=2.5)):
            scaled = out()
    assert torch.equal(same, clean)
    torch.testing.assert_close(scaled0, zero, atol=0, rtol=0)
    assert (scaled - clean).abs().max() > 1e-4


def _values(model, family, layer, run):
    """Value vectors [batch, seq, kv_head, d] of one layer, captured from the q/k/v projection outputs."""
    p = output_projections(model)[layer]
    seen = {}
    if family == "gpt2":
        mod, pick = p.block.c_attn, lambda o: o[..., 64:96]
    elif family == "bert":
        mod, pick = p.attention.value, lambda o: o
    else:
        mod, pick = p.block.v_proj, lambda o: o
    h = mod.register_forward_hook(lambda m, a, o: seen.__setitem__("v", pick(o).detach().clone()))
    try:
        with torch.no_grad():
            run()
    finally:
        h.remove()
    v = seen["v"]
    return v.reshape(*v.shape[:2], -1, D_HEAD)


def _allowed(family, mask, n, window=None):
    """[batch, query, key] allowed keys: padding, causal (decoders), sliding window."""
    keys = mask[:, None, :].bool().expand(-1, n, -1).clone()
    if family != "bert":
        t = torch.arange(n)
        keys &= t[None, :, None] >= t[None, None, :]
        if window is not None:
            keys &= t[None, None, :] > t[None, :, None] - window
    return keys


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "bert"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_uniform_mode_equals_uniform_attention_recomputed(family, attn):
    model, (ids, mask) = _peaked(tiny_text_model(family, attn)), _inputs()
    run = lambda: model(input_ids=ids, attention_mask=mask)  # noqa: E731
    head = 3
    z, _ = _proj_in_out(model, 1, run)
    v = _values(model, family, 1, run)  # [b, s, kv, d]
    kv = kv_head_of(head, 4, v.shape[2])
    allowed = _allowed(family, mask, ids.shape[1], 5 if family == "mistral" else None).float()
    uniform = (allowed / allowed.sum(-1, keepdim=True)) @ v[:, :, kv, :]  # [b, q, d]
    want = z.clone()
    want[..., head * D_HEAD:(head + 1) * D_HEAD] = uniform
    impl = model.config._attn_implementation
    with apply_plan(model, InterventionPlan(HeadSet([(1, head)]), "uniform")):
        z_got, got = _proj_in_out(model, 1, run)
    assert model.config._attn_implementation == impl and not hf_route._ACTIVE
    real = mask.bool()
    torch.testing.assert_close(z_got[real], want[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[real], _apply_proj(model, 1, want)[real], atol=1e-5, rtol=0)
    assert (z_got - z)[real].abs().max() > 1e-3  # the edit did something


@pytest.mark.parametrize("per_position", [False, True])
def test_mean_mode_equals_hand_mean(per_position):
    model = tiny_text_model("llama")
    ids, mask = _inputs()
    ref_ids = [[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15], [20, 21, 22, 23, 24, 25]]
    zs = []
    for r in ref_ids:
        z, _ = _proj_in_out(model, 0, lambda: model(input_ids=torch.tensor([r])))
        zs.append(z[0, :, 1 * D_HEAD:2 * D_HEAD])
    plan = mean_plan(model, HeadSet([(0, 1)]), ref_ids, per_position=per_position)
    plan = InterventionPlan.from_dict(json.loads(json.dumps(plan.to_dict())))  # a value: survives JSON
    run = lambda: model(input_ids=ids, attention_mask=mask)  # noqa: E731
    z, _ = _proj_in_out(model, 0, run)
    if per_position:
        mean = torch.stack([torch.stack([zz[t] for zz in zs if t < len(zz)]).mean(0) for t in range(8)])
        token_mean = mean.mean(0)
        fill = torch.cat([mean, token_mean.expand(ids.shape[1] - 8, -1)])  # past the reference: token mean
    else:
        fill = torch.cat(zs).mean(0).expand(ids.shape[1], -1)
    want = z.clone()
    want[..., D_HEAD:2 * D_HEAD] = fill
    with apply_plan(model, plan):
        got, _ = _proj_in_out(model, 0, run)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_resample_takes_the_other_reference_input():
    model = tiny_text_model("gpt2")
    x = [7, 8, 9, 10, 11]
    other = [30, 31, 32, 33, 34, 35, 36]
    z_other, _ = _proj_in_out(model, 1, lambda: model(input_ids=torch.tensor([other])))
    z_x, _ = _proj_in_out(model, 1, lambda: model(input_ids=torch.tensor([x])))
    plan = resample_plan(HeadSet([(1, 0)]), [x, other], seed=4)  # x itself is excluded: identical input
    with apply_plan(model, plan):
        got, _ = _proj_in_out(model, 1, lambda: model(input_ids=torch.tensor([x])))
    want = z_x.clone()
    want[..., :D_HEAD] = z_other[:, :5, :D_HEAD]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_hooks_are_removed_after_an_error():
    model, (ids, mask) = tiny_text_model("llama"), _inputs()
    with torch.no_grad():
        clean = model(input_ids=ids, attention_mask=mask).logits
    plans = [InterventionPlan(HeadSet([(1, 0)]), "zero"), InterventionPlan(HeadSet([(1, 0)]), "uniform"),
             resample_plan(HeadSet([(0, 1)]), [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])]
    for plan in plans:
        with pytest.raises(RuntimeError, match="boom"):
            with apply_plan(model, plan):
                raise RuntimeError("boom")
    assert all(not p.module._forward_pre_hooks for p in output_projections(model))
    assert not model._forward_pre_hooks and not hf_route._ACTIVE
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, clean)


def test_gqa_helpers_and_kv_selection():
    model = tiny_text_model("llama")  # 4 query heads, 2 KV heads
    projections = output_projections(model)
    assert [kv_head_of(h, 4, 2) for h in range(4)] == [0, 0, 1, 1]
    assert query_heads_of(1, 4, 2) == [2, 3]
    assert expand_kv_selection(HeadSet([(1, 1)]), projections) == HeadSet([(1, 2), (1, 3)])
    ids, mask = _inputs()
    with torch.no_grad():
        with apply_plan(model, InterventionPlan(HeadSet([(1, 1)]), "zero", select="kv")) as query:
            by_kv = model(input_ids=ids, attention_mask=mask).logits
        with apply_plan(model, InterventionPlan(HeadSet([(1, 2), (1, 3)]), "zero")):
            by_query = model(input_ids=ids, attention_mask=mask).logits
    assert query == HeadSet([(1, 2), (1, 3)])
    assert torch.equal(by_kv, by_query)
    with pytest.raises(HeadSpecError):
        InterventionPlan(HeadSet([(1, 2)]), "zero", select="kv").query_heads(projections)


def test_plan_validation_and_round_trip():
    with pytest.raises(InputError):
        InterventionPlan(HeadSet([(0, 0)]), "rescale")
    with pytest.raises(InputError):
        InterventionPlan(HeadSet([(0, 0)]), "bogus")
    with pytest.raises(InputError):
        InterventionPlan(HeadSet([(0, 0)]), "resample")
    plan = resample_plan(HeadSet.parse("L0H1,L1H0"), [[1, 2, 3]], seed=7, select="kv")
    assert InterventionPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    with pytest.raises(HeadSpecError):
        with apply_plan(tiny_text_model("gpt2"), InterventionPlan(HeadSet([(0, 9)]), "zero")):
            pass


def test_zero_ablate_heads_wrapper_and_capture_inside_a_plan():
    model, (ids, mask) = tiny_text_model("gpt2"), _inputs()
    with torch.no_grad():
        with zero_ablate_heads(model, {1: [0, 2]}) as heads:
            a = model(input_ids=ids, attention_mask=mask).logits
        with apply_plan(model, InterventionPlan(HeadSet([(1, 0), (1, 2)]), "zero")):
            b = model(input_ids=ids, attention_mask=mask).logits
    assert heads == HeadSet([(1, 0), (1, 2)]) and torch.equal(a, b)
    with apply_plan(model, InterventionPlan(HeadSet([(1, 0)]), "uniform")):
        trace = attnscope.capture(model, {"input_ids": ids, "attention_mask": mask})
        assert hf_route._ACTIVE  # the editor survives the capture's route
    assert len(trace.sites) == 2 and not hf_route._ACTIVE
