"""diffusers adapters: UNet, PixArt/DiT, SD3 (joint attention) and pipelines, on tiny random-init models.

Oracles: diffusers' own materialising ``AttnProcessor`` / our joint-attention definition (``reference_patterns``),
statistics recomputed here from those probabilities, and the UNet run alone on the conditional half of a
pipeline's CFG batch.
"""

import pytest
import torch

import diffusers  # noqa: F401

import attnscope  # noqa: E402
from attnscope.errors import UnsupportedAttentionError  # noqa: E402
from attnscope import Site  # noqa: E402
from attnscope.probes import validate  # noqa: E402
from attnscope.probes.adapter import adapter_for  # noqa: E402
from attnscope.probes.adapters import diffusers_common  # noqa: E402
from attnscope.probes.adapters.diffusers_dit import DiTAdapter, tiny_dit, tiny_pixart  # noqa: E402
from attnscope.probes.adapters.diffusers_pipeline import PipelineAdapter, tiny_sd_pipeline  # noqa: E402
from attnscope.probes.adapters.diffusers_sd3 import SD3Adapter, tiny_sd3  # noqa: E402
from attnscope.probes.adapters.diffusers_unet import UNetAdapter, tiny_unet  # noqa: E402

BUILDERS = {"unet": tiny_unet, "pixart": tiny_pixart, "dit": tiny_dit, "sd3": tiny_sd3}
ADAPTERS = {"unet": UNetAdapter, "pixart": DiTAdapter, "dit": DiTAdapter, "sd3": SD3Adapter}


@pytest.fixture(scope="module")
def models() -> dict:
    return {name: build() for name, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline()


def _state(model: torch.nn.Module) -> dict:
    """Everything capture may touch: processors, hooks, the patched functions, the thread-local entry."""
    from diffusers.models.attention_processor import Attention

    return {
        "processors": [(name, id(m.processor)) for name, m in model.named_modules() if hasattr(m, "processor")],
        "hooks": [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()],
        "sdpa": torch.nn.functional.scaled_dot_product_attention,
        "scores": Attention.__dict__["get_attention_scores"],
        "active": getattr(diffusers_common._LOCAL, "active", None),
        "patch_count": diffusers_common._PATCH["count"],
    }


@pytest.mark.parametrize("name", list(BUILDERS))
def test_validate_matches_the_materialising_reference(models, name):
    model = models[name]
    assert isinstance(adapter_for(model), ADAPTERS[name])
    report = validate(model)
    assert report.ok, str(report)
    assert report.output_bit_identical  # the model's own SDPA processors computed the output
    assert report.probs_max_diff < 1e-5 and report.row_sum_max_diff < 1e-5
    assert report.n_sites == len(adapter_for(model).info().sites)


def test_legacy_processor_is_read_through_get_attention_scores():
    from diffusers.models.attention_processor import AttnProcessor

    model = tiny_unet()
    model.set_attn_processor(AttnProcessor())
    report = validate(model)
    assert report.ok and report.attention_path == "AttnProcessor", str(report)


@pytest.mark.parametrize("name", ["unet", "sd3"])
def test_streaming_stats_equal_stats_of_the_reference(models, name):
    adapter = adapter_for(models[name])
    inputs = adapter.sample_inputs()
    spans, k = ((0, 2), (2, 5)), 3
    trace = attnscope.capture(adapter, inputs, stats=("mass", "entropy", "topk"), mass_spans=spans, topk=k)
    reference = adapter.reference_patterns(adapter.prepare(inputs))
    assert sorted(reference) == trace.sites
    for site in trace.sites:
        rec, p = trace[site], reference[site][0].double()
        assert rec.probs is None
        entropy = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
        mass = torch.stack([p[..., a:b].sum(-1) for a, b in spans], -1)
        torch.testing.assert_close(rec.stats["entropy"].double(), entropy, atol=1e-5, rtol=0)
        torch.testing.assert_close(rec.stats["mass"].double(), mass, atol=1e-5, rtol=0)
        top = p.topk(k, dim=-1)
        torch.testing.assert_close(rec.stats["topk_weight"].double(), top.values, atol=1e-5, rtol=0)
        assert torch.equal(rec.stats["topk_index"].long(), top.indices)


def test_unet_sites_towers_grids_and_masks(models):
    adapter = adapter_for(models["unet"])
    info = adapter.info()
    assert [t.name for t in info.towers] == ["unet.down.0", "unet.mid", "unet.up.1"]
    assert {s.kind for s in info.sites} == {"self", "cross"}
    trace = attnscope.capture(adapter, adapter.sample_inputs())  # 8x6 latent, item 1 pads its last 2 text tokens
    assert trace.tokens.grid == (8, 6)
    orders = [trace[s].meta["order"] for s in sorted(trace.sites, key=lambda s: trace[s].meta["order"])]
    assert orders == list(range(8))
    for site in trace.sites:
        rec = trace[site]
        grid = (4, 3) if site.tower == "unet.mid" else (8, 6)
        assert rec.meta["grid"] == list(grid) and rec.n_query == grid[0] * grid[1]
        if site.kind == "cross":
            assert rec.n_key == 5
            assert float(rec.probs[1, :, :, -2:].max()) < 1e-6  # the padded keys get no attention
            assert float(rec.probs[0, :, :, -2:].min()) > 0
    stacked = trace.stack("unet.up.1", "cross")
    assert stacked.shape == (2, 2, 2, 48, 5)


def test_sd3_joint_blocks_sum_to_one(models):
    adapter = adapter_for(models["sd3"])
    trace = attnscope.capture(adapter, adapter.sample_inputs())
    n_img, n_txt = 16, 5
    assert trace.tokens.grid == (4, 4)
    assert [(s.modality, s.start, s.end) for s in trace.tokens.spans] == [("latent", 0, 16), ("text", 16, 21)]
    for layer in range(3):
        rec = trace[Site("mmdit", layer, "joint")]
        assert rec.meta["blocks"] == {"image": [0, n_img], "text": [n_img, n_img + n_txt]}
        assert rec.meta.get("context_pre_only", False) == (layer == 2)  # the last block still attends jointly
        for rows in ("image", "text"):
            total = rec.block(rows, "image").sum(-1) + rec.block(rows, "text").sum(-1)
            torch.testing.assert_close(total, torch.ones_like(total), atol=1e-5, rtol=0)
        assert float(rec.block("image", "text").sum(-1).min()) > 0  # image queries do read the text
    dual = trace[Site("mmdit", 0, "self")]  # SD3.5 dual attention: image tokens only
    assert (dual.n_query, dual.n_key) == (n_img, n_img) and "blocks" not in dual.meta


def test_restored_after_capture_and_after_a_forward_that_raises(models):
    for name in ("unet", "sd3"):
        model = models[name]
        adapter = adapter_for(model)
        before = _state(model)
        attnscope.capture(adapter, adapter.sample_inputs(), stats=("entropy",))
        assert _state(model) == before
        bad = dict(adapter.sample_inputs())
        key = "encoder_hidden_states"
        bad[key] = torch.randn(2, 5, bad[key].shape[-1] + 1)  # wrong width: the forward raises
        for implementation in ("auto", "eager"):
            with pytest.raises(RuntimeError):
                attnscope.capture(adapter, bad, stats=("entropy",), implementation=implementation)
            assert _state(model) == before
    assert diffusers_common._PATCH["count"] == 0


def test_unobservable_processor_is_refused_and_eager_still_works():
    class OpaqueProcessor:  # computes attention without SDPA or get_attention_scores
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
            return attn.to_out[0](attn.to_v(hidden_states))

    model = tiny_dit()
    model.transformer_blocks[0].attn1.set_processor(OpaqueProcessor())
    with pytest.raises(UnsupportedAttentionError):
        attnscope.capture(model, adapter_for(model).sample_inputs())
    assert isinstance(model.transformer_blocks[0].attn1.processor, OpaqueProcessor)
    trace = attnscope.capture(model, adapter_for(model).sample_inputs(), implementation="eager")
    assert len(trace.sites) == 2 and "eager" in trace.provenance["attention_path"]
    assert isinstance(model.transformer_blocks[0].attn1.processor, OpaqueProcessor)


def test_pipeline_records_each_step_and_only_the_conditional_half(pipe):
    adapter = adapter_for(pipe)
    assert isinstance(adapter, PipelineAdapter) and isinstance(adapter.inner, UNetAdapter)
    inputs = adapter.sample_inputs()  # 2 steps, guidance 5: the UNet sees a batch of 2 (uncond, cond)
    seen = []
    handle = pipe.unet.register_forward_pre_hook(
        lambda m, a, kw: seen.append((a[0].clone(), a[1], kw["encoder_hidden_states"].clone())), with_kwargs=True)
    try:
        trace = attnscope.capture(adapter, inputs)
    finally:
        handle.remove()
    assert len(seen) == 2 and seen[0][0].shape[0] == 2
    site = Site("unet.up.1", 0, "cross")
    assert trace.steps(site) == [0, 1] and len(trace.sites) == 8
    assert trace.tokens.grid == (8, 8) and trace.tokens.strings[0][:2] == ["<|startoftext|>", "a</w>"]
    for step, (sample, t, context) in enumerate(seen):
        rec = trace.get(site, step)
        assert rec.probs.shape[0] == 1 and rec.meta["timestep"] == float(t)
        unet = UNetAdapter(pipe.unet)
        alone = {half: attnscope.capture(unet, {"sample": sample[sl], "timestep": t,
                                                "encoder_hidden_states": context[sl]})[site].probs
                 for half, sl in (("uncond", slice(0, 1)), ("cond", slice(1, 2)))}
        torch.testing.assert_close(rec.probs, alone["cond"], atol=1e-5, rtol=0)
        assert float((rec.probs - alone["uncond"]).abs().max()) > 1e-3
    only = attnscope.capture(adapter, inputs, stats=("entropy",), steps=[1])
    assert {step for _, step in only.records} == {1}


def test_pipeline_validates_and_is_repeatable(pipe):
    report = validate(pipe)
    assert report.ok and report.output_bit_identical, str(report)
    no_cfg = dict(adapter_for(pipe).sample_inputs(), guidance_scale=1.0)
    trace = attnscope.capture(pipe, no_cfg, stats=("entropy",))
    assert trace.get(Site("unet.mid", 0, "self"), 0).stats["entropy"].shape[0] == 1  # batch 1 without CFG
