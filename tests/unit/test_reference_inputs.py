"""Reference sets of any modality (``reference_inputs``), ALBERT's shared layers, GPT-OSS uniform with sinks.

Oracles: plain forward (pre-)hooks on the output projections (ViT ``attention.o_proj``) record and edit the
head slices by hand; ALBERT's own eager ``output_attentions`` (one tensor per application); the uniform-with-sink
row written out from the sink logits.
"""

import inspect
import json

import pytest
import torch
import transformers

import attnscope
from attnscope.errors import AttnscopeError, InputError
from attnscope.probes.head_slices import output_projections
from attnscope.probes.heads import HeadSet
from attnscope.probes.interventions import InterventionPlan, apply_plan, mean_plan, resample_plan
from attnscope.errors import ReferenceMismatchError

HEADS, D_HEAD = 4, 8


def _vit(cls: str = "ViT") -> torch.nn.Module:
    cfg = getattr(transformers, f"{cls}Config")(hidden_size=32, num_hidden_layers=2, num_attention_heads=HEADS,
                                                intermediate_size=64, image_size=16, patch_size=4)
    torch.manual_seed(0)
    return getattr(transformers, f"{cls}Model")(cfg).eval()


def _pixels(seed: int, n: int = 2, size: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _dense(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    return model.layers[layer].attention.o_proj


def _dense_input(model: torch.nn.Module, layer: int, pixels: torch.Tensor) -> torch.Tensor:
    """The output projection's input (all heads' outputs) of ``layer``, by a plain forward pre-hook."""
    seen = []
    handle = _dense(model, layer).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    try:
        with torch.no_grad():
            model(pixel_values=pixels)
    finally:
        handle.remove()
    return seen[0]


def _slice(head: int) -> slice:
    return slice(head * D_HEAD, (head + 1) * D_HEAD)


def test_resample_of_a_vit_head_is_the_head_output_on_the_reference_image():
    model, layer, head = _vit(), 1, 2
    x, reference = _pixels(0), _pixels(1, n=1)
    want_slice = _dense_input(model, layer, reference)[:, :, _slice(head)]  # [1, seq, d]

    def by_hand(module, args):  # the head's slice replaced by the reference image's, for every row
        edited = args[0].clone()
        edited[:, :, _slice(head)] = want_slice
        return (edited,)
    handle = _dense(model, layer).register_forward_pre_hook(by_hand)
    with torch.no_grad():
        want = model(pixel_values=x).last_hidden_state
    handle.remove()
    plan = resample_plan(HeadSet([(layer, head)]), {"pixel_values": reference}, seed=0)
    with apply_plan(model, plan), torch.no_grad():
        got = model(pixel_values=x).last_hidden_state
        got_slice = _dense_input(model, layer, x)[:, :, _slice(head)]
    assert torch.allclose(got_slice, want_slice.expand_as(got_slice), atol=1e-6)
    assert torch.allclose(got, want, atol=1e-5)
    with torch.no_grad():
        clean = model(pixel_values=x).last_hidden_state
    assert float((got - clean).abs().max()) > 1e-3  # the edit is visible


def test_resample_draws_the_seeded_row_among_other_images():
    import numpy as np

    model, layer, head = _vit(), 0, 1
    x, references = _pixels(0), _pixels(2, n=3)
    recorded = _dense_input(model, layer, references)[:, :, _slice(head)]  # [3, seq, d]
    plan = resample_plan(HeadSet([(layer, head)]), [{"pixel_values": references}], seed=5)
    with apply_plan(model, plan):
        got = _dense_input(model, layer, x)[:, :, _slice(head)]
    for row in range(2):
        drawn = int(np.random.default_rng([5, row]).integers(3))  # the documented draw: every row differs
        assert torch.allclose(got[row], recorded[drawn], atol=1e-6)


def test_mean_over_reference_images_equals_the_hook_mean():
    model, layer, head = _vit(), 1, 0
    references = _pixels(3, n=3)
    want = _dense_input(model, layer, references)[:, :, _slice(head)].double().mean((0, 1))
    plan = mean_plan(model, HeadSet([(layer, head)]), {"pixel_values": references})
    assert torch.allclose(torch.tensor(plan.mean_values[(layer, head)], dtype=torch.float64), want, atol=1e-6)
    lazy = InterventionPlan(HeadSet([(layer, head)]), "mean", reference_inputs={"pixel_values": references})
    with apply_plan(model, lazy):
        got = _dense_input(model, layer, _pixels(0))[:, :, _slice(head)]
    assert torch.allclose(got, want.float().expand_as(got), atol=1e-6)


def test_mismatching_reference_inputs_raise_a_clear_error():
    model = _vit()
    heads = HeadSet([(0, 0)])
    with pytest.raises(ReferenceMismatchError) as wrong_keys:  # audio features for an image model
        with apply_plan(model, resample_plan(heads, {"input_features": torch.randn(2, 8, 32)})):
            pass
    assert isinstance(wrong_keys.value, InputError) and wrong_keys.value.fix and wrong_keys.value.got
    assert "pixel_values" in str(wrong_keys.value.expected)
    with pytest.raises(AttnscopeError, match="reference token inputs"):  # token ids for an image model
        with apply_plan(model, resample_plan(heads, [[1, 2, 3]])):
            pass
    dinov2 = _vit("Dinov2")  # interpolates its position embeddings: a larger image runs, with more patches
    plan = resample_plan(heads, {"pixel_values": _pixels(1, size=24)})
    with pytest.raises(ReferenceMismatchError, match="do not fit the edited input") as positions:
        with apply_plan(dinov2, plan), torch.no_grad():
            dinov2(pixel_values=_pixels(0))
    assert "17 positions" in str(positions.value.expected) and "37 positions" in str(positions.value.got)
    with pytest.raises(ReferenceMismatchError):  # a wrong channel count cannot run at all
        with apply_plan(model, resample_plan(heads, {"pixel_values": torch.randn(1, 1, 16, 16)})):
            pass


def test_plan_with_reference_inputs_round_trips_through_json():
    plan = resample_plan(HeadSet([(1, 2)]), {"pixel_values": _pixels(1, n=1)}, seed=4)
    again = InterventionPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan and torch.equal(again.reference_inputs["pixel_values"], plan.reference_inputs["pixel_values"])
    assert again != resample_plan(HeadSet([(1, 2)]), {"pixel_values": _pixels(2, n=1)}, seed=4)
    with pytest.raises(InputError, match="two reference sets"):
        InterventionPlan(HeadSet([(0, 0)]), "resample", reference_ids=[[1]], reference_inputs={"x": torch.ones(1)})


# ---- ALBERT: one attention module applied num_hidden_layers times ------------------------------------------------

def _albert(attn: str = "sdpa") -> torch.nn.Module:
    cfg = transformers.AlbertConfig(vocab_size=40, embedding_size=16, hidden_size=32, num_hidden_layers=3,
                                    num_attention_heads=HEADS, intermediate_size=64, attn_implementation=attn)
    torch.manual_seed(0)
    return transformers.AlbertModel(cfg).eval()


def _ids() -> dict[str, torch.Tensor]:
    ids = torch.randint(4, 40, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_albert_capture_records_each_application_as_its_own_layer():
    model, inputs = _albert(), _ids()
    trace = attnscope.capture(model, inputs)
    assert [str(s) for s in trace.sites] == ["text.L0.self", "text.L1.self", "text.L2.self"]
    assert sorted({step for _, step in trace.records}) == [0]
    eager = _albert("eager")
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        weights = eager(**inputs, output_attentions=True).attentions
    assert len(weights) == 3
    for site, want in zip(trace.sites, weights):
        assert torch.allclose(trace.records[(site, 0)].probs, want, atol=1e-5)
    assert float((weights[0] - weights[2]).abs().max()) > 1e-3  # the applications differ


def test_albert_edit_of_layer_k_acts_on_the_kth_application_only():
    model, inputs, layer, head = _albert(), _ids(), 1, 3
    projections = output_projections(model)
    assert [p.application for p in projections] == [0, 1, 2]
    dense = model.encoder.albert_layer_groups[0].albert_layers[0].attention.dense
    calls = {"n": 0}

    def by_hand(module, args):  # zero the head's slice on the second call of the shared projection only
        calls["n"] += 1
        if calls["n"] - 1 != layer:
            return None
        edited = args[0].clone()
        edited[..., _slice(head)] = 0
        return (edited,)
    handle = dense.register_forward_pre_hook(by_hand)
    with torch.no_grad():
        want = model(**inputs).last_hidden_state
    handle.remove()
    with apply_plan(model, InterventionPlan(HeadSet([(layer, head)]), "zero")), torch.no_grad():
        got = model(**inputs).last_hidden_state
    assert torch.allclose(got, want, atol=1e-5)
    with apply_plan(model, InterventionPlan(HeadSet([(l, head) for l in range(3)]), "zero")), torch.no_grad():
        every = model(**inputs).last_hidden_state
    assert float((every - got).abs().max()) > 1e-3  # editing one application is not editing all of them


# ---- GPT-OSS: uniform attention with a learned sink -------------------------------------------------------------

def test_gpt_oss_uniform_keeps_the_sink_mass_and_spreads_the_rest():
    cfg = transformers.GptOssConfig(vocab_size=40, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=HEADS, num_key_value_heads=2, head_dim=D_HEAD,
                                    num_local_experts=2, num_experts_per_tok=1, sliding_window=64,
                                    layer_types=["full_attention"], attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(cfg).eval()
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        attn.sinks.copy_(torch.tensor([2.0, -1.0, 0.5, 1.0]))
    ids = torch.randint(4, 40, (1, 6), generator=torch.Generator().manual_seed(2))
    seen = {}

    def keep(module, args, kwargs, out):
        seen["x"] = kwargs["hidden_states"].detach()
    handle = attn.register_forward_hook(keep, with_kwargs=True)
    head = 2
    with apply_plan(model, InterventionPlan(HeadSet([(0, head)]), "uniform")), torch.no_grad():
        handle2 = attn.o_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("z", a[0].detach()))
        model(ids)
        handle2.remove()
    handle.remove()
    want, p_sink = _uniform_with_sink_by_hand(model, seen["x"], head)
    got = seen["z"].view(1, 6, HEADS, D_HEAD)[0, :, head]
    assert torch.allclose(got, want, atol=1e-5)
    assert float(p_sink.min()) > 0.05  # the sink takes visible mass


@torch.no_grad()
def _uniform_with_sink_by_hand(model, x, head):
    """``(1 - p_sink) * mean(V over the causal keys)`` from the layer's weights, and ``p_sink`` per query."""
    from transformers.models.gpt_oss.modeling_gpt_oss import apply_rotary_pos_emb

    attn, n = model.model.layers[0].self_attn, x.shape[1]
    q = attn.q_proj(x).view(1, n, HEADS, D_HEAD).transpose(1, 2)
    k = attn.k_proj(x).view(1, n, 2, D_HEAD).transpose(1, 2)
    v = attn.v_proj(x).view(1, n, 2, D_HEAD).transpose(1, 2)
    cos, sin = model.model.rotary_emb(x, torch.arange(n)[None])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    kv = head // 2
    scores = (q[0, head] @ k[0, kv].T) * D_HEAD ** -0.5 + torch.full((n, n), float("-inf")).triu(1)
    p_sink = torch.softmax(torch.cat([scores, attn.sinks[head].expand(n, 1)], -1), -1)[:, -1]
    counts = torch.arange(1, n + 1, dtype=torch.float32)[:, None]
    return (1 - p_sink)[:, None] * (v[0, kv].cumsum(0) / counts), p_sink


# ---- the coverage checks can fail -------------------------------------------------------------------------------

def _coverage_subject(name: str):
    from attnscope.probes.coverage import ARCHITECTURES, inputs_for
    from attnscope.probes.coverage.checks import Subject

    model = ARCHITECTURES[name].builder()
    return Subject(name, model, inputs_for(name, model))


def test_a_wrong_draw_fails_the_resample_column(monkeypatch):
    """The plan draws with seed 1 (rows [0, 1]) while the reference edit states seed 0's draw (rows [1, 1])."""
    from attnscope.probes.coverage import intervention_checks
    from attnscope.probes.coverage.outcome import cell_of

    assert cell_of(lambda: intervention_checks.check_mode(_coverage_subject("vit"), "resample")) == "pass"
    original = intervention_checks.resample_plan
    monkeypatch.setattr(intervention_checks, "resample_plan", lambda heads, refs, seed=0: original(heads, refs, seed=1))
    cell = cell_of(lambda: intervention_checks.check_mode(_coverage_subject("vit"), "resample"))
    assert cell.startswith("fail: outputs differ")


def test_an_edit_of_every_application_fails_albert_zero(monkeypatch):
    """A reference that edits the shared module on every call (what attnscope did before) disagrees."""
    from attnscope.probes.coverage import intervention_checks
    from attnscope.probes.coverage.outcome import cell_of

    assert cell_of(lambda: intervention_checks.check_mode(_coverage_subject("albert"), "zero")) == "pass"

    def every_call(edits):
        def edit(module, out, *rest):
            for chosen in edits.values():
                out = chosen(module, out, *rest)
            return out
        return edit
    monkeypatch.setattr(intervention_checks, "per_call", every_call)
    cell = cell_of(lambda: intervention_checks.check_mode(_coverage_subject("albert"), "zero"))
    assert cell.startswith("fail: outputs differ")


# ---- a diffusers pipeline: reference inputs are its denoiser's kwargs --------------------------------------------

def test_resample_in_a_pipeline_takes_the_drawn_rows_of_the_denoiser_reference():
    """Reference: the denoiser kwargs of the clean run's first step (rows: unconditional, conditional). At that
    step every input row equals its own reference row, so each draws the other one; at the second step (other
    latents and timestep) each row draws ``default_rng([0, row])`` among both."""
    import numpy as np
    from tiny_diffusion import run_inputs

    from attnscope.probes.adapters.tiny_pipelines import tiny_pixart_pipeline

    pipe = tiny_pixart_pipeline()
    proj, head = output_projections(pipe)[-1], 1  # after a cross-attention: the two rows differ
    cut = slice(head * proj.d_head, (head + 1) * proj.d_head)
    calls, inputs = [], []
    signature = inspect.signature(pipe.transformer.forward)  # the pipeline passes the latents positionally
    hooks = [pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: calls.append({k: v.clone() if torch.is_tensor(v) else v
                                       for k, v in signature.bind_partial(*a, **kw).arguments.items()}),
        with_kwargs=True),
             proj.attention.to_out[0].register_forward_pre_hook(lambda m, a: inputs.append(a[0][..., cut].clone()))]
    with torch.no_grad():
        pipe(**run_inputs("pixart", ["a red cat"]))
    for handle in hooks:
        handle.remove()
    reference = {k: v.clone() if torch.is_tensor(v) else v for k, v in calls[0].items()
                 if torch.is_tensor(v) or isinstance(v, dict)}
    clean_first = inputs[0]  # [2, seq, d]: the head on the reference rows
    assert float((clean_first[0] - clean_first[1]).abs().max()) > 1e-3 and len(inputs) == 2
    edited = []
    with torch.no_grad(), apply_plan(pipe, resample_plan(HeadSet([(proj.layer, head)]), reference, seed=0)):
        handle = proj.attention.to_out[0].register_forward_pre_hook(  # after the plan's own reference run
            lambda m, a: edited.append(a[0][..., cut].clone()))
        pipe(**run_inputs("pixart", ["a red cat"]))
    handle.remove()
    assert len(edited) == 2
    assert torch.allclose(edited[0], clean_first[[1, 0]], atol=1e-6)
    drawn = [int(np.random.default_rng([0, row]).integers(2)) for row in range(2)]
    assert torch.allclose(edited[1], clean_first[drawn], atol=1e-6)
    assert float((inputs[1] - clean_first[drawn]).abs().max()) > 1e-3  # the second step's own outputs differ
