"""Head interventions on diffusers denoisers through the SDPA side channel (the place capture reads), against
independent references: a pre-hook on the attention's own output projections (``to_out[0]``, and ``to_add_out`` for
the text stream of joint attention), and diffusers' legacy ``AttnProcessor`` with its probabilities overwritten."""

import pytest
import torch
from tiny_diffusion import BUILDERS, run_inputs

from attnscope.errors import UnsupportedAttentionError
from attnscope.probes.head_slices import output_projections
from attnscope.probes.heads import HeadSet
from attnscope.probes.interventions import InterventionPlan, apply_plan


def _first_joint_or_last(projections):
    joint = [p for p in projections if getattr(p.attention, "add_q_proj", None) is not None
             and getattr(p.attention, "to_add_out", None) is not None]
    return joint[0] if joint else projections[-1]


def _slice_hook(head: int, d: int, factor: float):
    def hook(module, args):
        x = args[0].clone()
        x[..., head * d:(head + 1) * d] *= factor
        return (x,) + tuple(args[1:])
    return hook


def _latents(pipe, seed: int = 0):
    return pipe(**run_inputs(_name(pipe), ["a red cat"], seed=seed)).images


def _name(pipe):
    return {"StableDiffusionPipeline": "unet", "PixArtAlphaPipeline": "pixart",
            "StableDiffusion3Pipeline": "sd3"}[type(pipe).__name__]


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("mode,factor", [("zero", 0.0), ("rescale", 2.5)])
def test_head_output_edit_equals_a_projection_input_hook(name, mode, factor):
    pipe = BUILDERS[name]()
    projections = output_projections(pipe)
    assert all(p.family == "diffusers" for p in projections)
    proj, head = _first_joint_or_last(projections), 1
    plan = InterventionPlan(HeadSet([(proj.layer, head)]), mode, scale=factor if mode == "rescale" else None)
    clean = _latents(pipe)
    with torch.no_grad(), apply_plan(pipe, plan):
        ours = _latents(pipe)
    attn = proj.attention
    handles = [attn.to_out[0].register_forward_pre_hook(_slice_hook(head, proj.d_head, factor))]
    if getattr(attn, "to_add_out", None) is not None:
        handles.append(attn.to_add_out.register_forward_pre_hook(_slice_hook(head, proj.d_head, factor)))
    try:
        with torch.no_grad():
            reference = _latents(pipe)
    finally:
        for h in handles:
            h.remove()
    assert float((ours - clean).abs().max()) > 1e-4  # the edit changed the image
    assert torch.allclose(ours, reference, atol=1e-5), float((ours - reference).abs().max())


def test_uniform_attention_equals_the_legacy_processor_with_uniform_probabilities():
    from diffusers.models.attention_processor import AttnProcessor

    pipe = BUILDERS["unet"]()
    projections = output_projections(pipe)
    proj, head = projections[1], 0  # a cross-attention module of the UNet
    with torch.no_grad(), apply_plan(pipe, InterventionPlan(HeadSet([(proj.layer, head)]), "uniform")):
        ours = _latents(pipe)
    attn = proj.attention
    original_processor, original_scores = attn.processor, attn.get_attention_scores

    def uniform_scores(query, key, attention_mask=None):
        probs = original_scores(query, key, attention_mask)
        view = probs.view(-1, attn.heads, *probs.shape[1:])
        view[:, head] = 1.0 / probs.shape[-1]
        return probs

    attn.set_processor(AttnProcessor())
    attn.get_attention_scores = uniform_scores
    try:
        with torch.no_grad():
            reference = _latents(pipe)
    finally:
        del attn.get_attention_scores
        attn.set_processor(original_processor)
    assert torch.allclose(ours, reference, atol=1e-5), float((ours - reference).abs().max())


def test_an_edit_that_cannot_reach_the_attention_is_refused_and_nothing_stays_installed():
    from diffusers.models.attention_processor import AttnProcessor

    import attnscope.probes.adapters.diffusers_common as dc

    pipe = BUILDERS["unet"]()
    proj = output_projections(pipe)[0]
    proj.attention.set_processor(AttnProcessor())  # materialises probabilities: no SDPA call to edit
    with pytest.raises(UnsupportedAttentionError, match="SDPA"):
        with apply_plan(pipe, InterventionPlan(HeadSet([(proj.layer, 0)]), "zero")):
            _latents(pipe)
    assert dc._PATCH["count"] == 0 and getattr(dc._LOCAL, "edit", None) is None
    assert torch.nn.functional.scaled_dot_product_attention is not dc._patched_sdpa


@pytest.mark.parametrize("mode", ["resample", "mean"])
def test_token_modes_are_refused_on_a_denoiser(mode):
    from attnscope.errors import UnsupportedModelError

    pipe = BUILDERS["pixart"]()
    plan = InterventionPlan(HeadSet([(0, 0)]), mode, reference_ids=[[1, 2, 3]])
    with pytest.raises(UnsupportedModelError, match="reference token inputs") as err:
        with apply_plan(pipe, plan):
            pass
    assert err.value.fix
