"""Cross-attention edits (rescale, mask, replace) on tiny UNet, PixArt and SD3 pipelines.

Oracles: the unedited run (bit-identical with an empty plan; the eager path within float error), the unedited
capture edited by hand (rescale of one head), the definition of masking (exact zeros, rows sum to 1), the source
trace (replace), and the processors/hooks before the context (restored, also after errors).
"""

import pytest
import torch

import attnscope
from attnscope import Site
from attnscope.errors import InputError, SiteError
from attnscope.probes.adapter import adapter_for
from attnscope.probes.cross_attention_edits import apply_cross_attention_edits, record_source
from attnscope.probes.cross_attention_plan import CrossAttentionEdit, CrossAttentionPlan
from tiny_diffusion import BUILDERS, RED, run_inputs

PROMPTS = ["a red cat", "a big red dog"]


@pytest.fixture(scope="module")
def pipes() -> dict:
    return {name: build() for name, build in BUILDERS.items()}


def _text_sites(pipe) -> list[Site]:
    return [s for s in adapter_for(pipe).info().sites if s.kind in ("cross", "joint")]


def _first_site(pipe) -> Site:
    """The text site that runs first in a denoiser call (its inputs at step 0 do not depend on any edit)."""
    table = adapter_for(pipe).inner._table()
    return [site for _, _, site in table if site.kind in ("cross", "joint")][0]


def _text_block(rec) -> torch.Tensor:
    if rec.site.kind == "joint":
        return rec.block("image", "text")
    return rec.probs


def _processors(pipe) -> list:
    den = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    return [(n, id(m.processor)) for n, m in den.named_modules() if hasattr(m, "processor")] + [
        len(m._forward_pre_hooks) for m in den.modules()]


def _latents(pipe, name, prompts=PROMPTS, steps=2):
    return pipe(**run_inputs(name, prompts, num_inference_steps=steps)).images


@pytest.mark.parametrize("name", list(BUILDERS))
def test_empty_plan_is_bit_identical_and_rescale_one_is_within_float_error(pipes, name):
    pipe = pipes[name]
    base = _latents(pipe, name)
    with apply_cross_attention_edits(pipe, CrossAttentionPlan()):
        assert torch.equal(_latents(pipe, name), base)  # no processor swapped
    one = CrossAttentionPlan([CrossAttentionEdit("rescale", factor=1.0)])
    first = _latents(pipe, name, steps=1)
    with apply_cross_attention_edits(pipe, one) as ctx:  # eager path: materialised probabilities
        eager = _latents(pipe, name, steps=1)
    assert len(ctx.applied) == len(_text_sites(pipe))  # every text site, one step
    scale = float(first.abs().max())
    assert float((eager - first).abs().max()) <= 1e-6 * max(scale, 1.0)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_mask_gives_exact_zeros_and_rows_sum_to_one(pipes, name):
    pipe = pipes[name]
    red = RED[name]
    plan = CrossAttentionPlan([CrossAttentionEdit("mask", positions=red)])
    with apply_cross_attention_edits(pipe, plan):
        trace = attnscope.capture(pipe, run_inputs(name, PROMPTS))
    for site in _text_sites(pipe):
        for step in trace.steps(site):
            rec = trace.get(site, step)
            block = _text_block(rec)
            assert float(block[..., red].abs().max()) == 0.0
            rows = rec.probs.sum(-1) if site.kind != "joint" else rec.probs[:, :, :block.shape[2]].sum(-1)
            torch.testing.assert_close(rows, torch.ones_like(rows), atol=1e-5, rtol=0)
            assert float(block.sum(-1).min()) > 0  # the other text tokens still get attention


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("factor", [0.5, -2.0])
def test_rescale_of_one_head_changes_only_that_head(pipes, name, factor):
    pipe, site, red = pipes[name], _first_site(pipes[name]), RED[name]
    base = _text_block(attnscope.capture(pipe, run_inputs(name, PROMPTS), sites=[site], steps=[0]).get(site, 0))
    plan = CrossAttentionPlan([CrossAttentionEdit("rescale", positions=red, sites=[site], heads=[1], factor=factor)])
    with apply_cross_attention_edits(pipe, plan):
        edited = attnscope.capture(pipe, run_inputs(name, PROMPTS), sites=[site], steps=[0]).get(site, 0)
    expected = base.clone()
    expected[:, 1, :, red] *= factor  # the definition, applied to the unedited capture
    torch.testing.assert_close(_text_block(edited), expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(_text_block(edited)[:, 0], base[:, 0], atol=1e-5)


@pytest.mark.parametrize("name", ["unet", "sd3"])
def test_step_range_and_renormalise(pipes, name):
    pipe, site, red = pipes[name], _first_site(pipes[name]), RED[name]
    base = attnscope.capture(pipe, run_inputs(name, PROMPTS), sites=[site])
    edit = CrossAttentionEdit("rescale", positions=red, sites=[site], factor=3.0, renormalize=True,
                              step_range=(0.5, 1.0))
    with apply_cross_attention_edits(pipe, CrossAttentionPlan([edit])) as ctx:
        edited = attnscope.capture(pipe, run_inputs(name, PROMPTS), sites=[site])
    assert ctx.applied == [(site, 1)]  # 2 steps: only the second half
    assert torch.allclose(edited.get(site, 0).probs, base.get(site, 0).probs, atol=1e-6)
    rec = edited.get(site, 1)
    block = _text_block(rec)
    n_rows = block.shape[2]
    torch.testing.assert_close(rec.probs[:, :, :n_rows].sum(-1), torch.ones(block.shape[:3]), atol=1e-5, rtol=0)
    assert float((block[..., red] - _text_block(base.get(site, 1))[..., red]).abs().max()) > 1e-3


@pytest.mark.parametrize("name", list(BUILDERS))
def test_replace_uses_the_recorded_maps_of_another_prompt(pipes, name):
    pipe = pipes[name]
    source = record_source(pipe, run_inputs(name, ["a red cat", "a red cat"], seed=5))
    assert {s.kind for s in source.sites} <= {"cross", "joint"}
    plan = CrossAttentionPlan([CrossAttentionEdit("replace", source="cat")])
    with apply_cross_attention_edits(pipe, plan, sources={"cat": source}):
        swapped = attnscope.capture(pipe, run_inputs(name, ["a big dog", "a green car"]))
    for site in _text_sites(pipe):
        for step in swapped.steps(site):
            got, want = _text_block(swapped.get(site, step)), _text_block(source.get(site, step))
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_processors_restored_after_errors_and_bad_plans(pipes):
    pipe = pipes["sd3"]
    before = _processors(pipe)
    plan = CrossAttentionPlan([CrossAttentionEdit("mask", positions=[99])])  # out of range: raises in the forward
    with pytest.raises(InputError), apply_cross_attention_edits(pipe, plan):
        _latents(pipe, "sd3")
    assert _processors(pipe) == before
    with pytest.raises(RuntimeError), apply_cross_attention_edits(pipe, CrossAttentionPlan([
            CrossAttentionEdit("rescale", factor=2.0)])):
        raise RuntimeError("user code fails inside the context")
    assert _processors(pipe) == before
    every = CrossAttentionPlan([CrossAttentionEdit("mask")])  # no key left: refused, not NaN
    with pytest.raises(InputError), apply_cross_attention_edits(pipes["unet"], every):
        _latents(pipes["unet"], "unet")
    with pytest.raises(SiteError):
        with apply_cross_attention_edits(pipe, CrossAttentionPlan([CrossAttentionEdit(
                "rescale", sites=[Site("mmdit", 9, "joint")])])):
            pass
    with pytest.raises(InputError):
        CrossAttentionEdit("rescale", sites=[Site("mmdit", 0, "self")])
    with pytest.raises(InputError):
        CrossAttentionEdit("replace")


def test_plan_json_round_trip():
    plan = CrossAttentionPlan([
        CrossAttentionEdit("rescale", positions=[1, 2], sites=[Site("unet.up.1", 0, "cross")], heads=[0], factor=-2.0,
                           step_range=(0.0, 1.01)),
        CrossAttentionEdit("mask", positions=[3], steps=[0, 1], batch="all"),
        CrossAttentionEdit("replace", source="trace.safetensors", renormalize=True)], num_steps=10,
        metadata={"why": "test"})
    again = CrossAttentionPlan.from_json(plan.to_json())
    assert again == plan and again.edits[0].sites[0] == Site("unet.up.1", 0, "cross")
    assert [e.at_step(9, 10) for e in again.edits] == [True, False, True]
    with pytest.raises(InputError):
        CrossAttentionPlan.from_dict({"format": "other"})
