"""diffusers adapters of Flux, Wan (T2V, I2V), CogVideoX (sin-cos and rotary) and HunyuanVideo on tiny random-init
denoisers (weights perturbed so that attention is peaked, not uniform).

Oracles: the adapters' reference processors written from each attention's definition (own projections, q/k norms,
own rotary code, one softmax), which must also reproduce the model's own outputs when swapped in; token counts
of the inputs for block ranges and grids; padding masks (padded text keys get exactly 0); and head edits against
the same reference processors with their probabilities / scores edited.
"""

import contextlib

import pytest
import torch

import diffusers  # noqa: F401

import attnscope  # noqa: E402
from attnscope import Site  # noqa: E402
from attnscope.errors import UnsupportedAttentionError  # noqa: E402
from attnscope.probes import validate  # noqa: E402
from attnscope.probes.adapter import adapter_for  # noqa: E402
from attnscope.probes.adapters import diffusers_common  # noqa: E402
from attnscope.probes.adapters.diffusers_cogvideox import CogVideoXAdapter, tiny_cogvideox  # noqa: E402
from attnscope.probes.adapters.diffusers_flux import (FluxAdapter, FluxReferenceProcessor, image_ids,  # noqa: E402
                                                      tiny_flux)
from attnscope.probes.adapters.diffusers_hunyuan_video import HunyuanVideoAdapter, tiny_hunyuan_video  # noqa: E402
from attnscope.probes.adapters.diffusers_sequence import uniform_logits  # noqa: E402
from attnscope.probes.adapters.diffusers_wan import WanAdapter, tiny_wan  # noqa: E402
from attnscope.probes.head_slices import output_projections  # noqa: E402
from attnscope.probes.heads import HeadSet  # noqa: E402
from attnscope.probes.interventions import InterventionPlan, apply_plan  # noqa: E402
from attnscope.probes.recorder import Recorder  # noqa: E402
from attnscope.probes.request import CaptureRequest  # noqa: E402

FAMILIES = {
    "flux": (FluxAdapter, lambda: tiny_flux(layers=1, single_layers=2)),
    "wan": (WanAdapter, tiny_wan),
    "wan_i2v": (WanAdapter, lambda: tiny_wan(image_dim=12)),
    "cogvideox": (CogVideoXAdapter, tiny_cogvideox),
    "cogvideox_rope": (CogVideoXAdapter, lambda: tiny_cogvideox(rotary=True)),
    "hunyuan_video": (HunyuanVideoAdapter, tiny_hunyuan_video),
}
# sample inputs: 5 text tokens (Wan I2V: 512), 2 x 3 x 4 latent patches (Flux: a 3 x 4 token grid)
SITES = {
    "flux": ["flux.double.L0.joint", "flux.single.L0.joint", "flux.single.L1.joint"],
    "wan": ["wan.blocks.L0.cross", "wan.blocks.L0.self", "wan.blocks.L1.cross", "wan.blocks.L1.self"],
    "cogvideox": ["cogvideox.blocks.L0.joint", "cogvideox.blocks.L1.joint"],
    "hunyuan_video": ["hunyuan_video.double.L0.joint", "hunyuan_video.refiner.L0.self",
                      "hunyuan_video.single.L0.joint"],
}
SITES.update(wan_i2v=SITES["wan"], cogvideox_rope=SITES["cogvideox"])
BLOCKS = {"flux": {"text": [0, 5], "image": [5, 17]}, "cogvideox": {"text": [0, 5], "image": [5, 29]},
          "hunyuan_video": {"image": [0, 24], "text": [24, 29]}}
BLOCKS["cogvideox_rope"] = BLOCKS["cogvideox"]
ATOL = 1e-5


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


@pytest.fixture(scope="module")
def adapters() -> dict:
    torch.manual_seed(0)
    return {name: cls(_perturbed(build())) for name, (cls, build) in FAMILIES.items()}


@pytest.fixture(scope="module")
def traces(adapters) -> dict:
    return {name: attnscope.capture(a, a.sample_inputs()) for name, a in adapters.items()}


@pytest.fixture(scope="module")
def references(adapters) -> dict:
    return {name: a.reference_patterns(a.prepare(a.sample_inputs())) for name, a in adapters.items()}


def _run(adapter) -> torch.Tensor:
    with torch.no_grad():
        return adapter.module(**adapter.sample_inputs()).sample


@contextlib.contextmanager
def _reference_processors(adapter, edits: dict | None = None):
    """Every attention module on the adapter's reference processor; ``edits``: id(module) -> (logits, probs) edits."""
    swapped = []
    try:
        for _, m, _ in adapter._table():
            proc = adapter.reference_processor(m)
            proc.edit_logits, proc.edit_probs = (edits or {}).get(id(m), (None, None))
            swapped.append((m, m.processor))
            m.set_processor(proc)
        yield
    finally:
        for m, proc in reversed(swapped):
            m.set_processor(proc)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_registry_picks_the_family_adapter(name, adapters):
    assert type(adapter_for(adapters[name].module)) is FAMILIES[name][0]
    assert [str(s) for s in adapters[name].info().sites] == SITES[name]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_capture_equals_the_definition_reference(name, traces, references):
    trace = traces[name]
    assert [str(s) for s in trace.sites] == SITES[name]
    peak = 0.0
    for (site, step), rec in trace.records.items():
        want = references[name][site][step]
        assert rec.probs.shape == want.shape
        assert float((rec.probs - want).abs().max()) < ATOL, site
        assert torch.allclose(rec.probs.sum(-1), torch.ones(()), atol=ATOL)
        peak = max(peak, float(rec.probs.max()))
    assert peak > 0.25  # peaked attention (uniform would be <= 1/5): not two near-uniform matrices agreeing


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_reference_processors_reproduce_the_model(name, adapters):
    """The definitions the reference is written from are the model's attention: swapped in, same outputs."""
    adapter = adapters[name]
    own = _run(adapter)
    with _reference_processors(adapter):
        ours = _run(adapter)
    assert float((own - ours).abs().max()) < ATOL * max(1.0, float(own.abs().max()))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_validate_ok_and_observational(name, adapters):
    adapter = adapters[name]
    processors = {n: m.processor for n, m in adapter.module.named_modules() if hasattr(m, "processor")}
    sdpa = torch.nn.functional.scaled_dot_product_attention
    report = validate(adapter)
    assert report.ok, str(report)
    assert report.output_bit_identical and report.probs_max_diff < ATOL
    assert torch.nn.functional.scaled_dot_product_attention is sdpa
    assert {n: m.processor for n, m in adapter.module.named_modules() if hasattr(m, "processor")} == processors
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in adapter.module.modules())
    assert getattr(diffusers_common._LOCAL, "active", None) is None


def test_rotary_embedding_is_material_to_the_reference(adapters, traces):
    """A reference that forgets Flux's rotary embedding disagrees with capture: the 1e-5 agreement has teeth."""
    adapter = adapters["flux"]

    class NoRotary(FluxReferenceProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, None)

    original = adapter.reference_processor
    adapter.reference_processor = lambda module: NoRotary()
    try:
        wrong = adapter.reference_patterns(adapter.prepare(adapter.sample_inputs()))
    finally:
        adapter.reference_processor = original
    rec = traces["flux"].get(Site("flux.double", 0, "joint"))
    assert float((rec.probs - wrong[rec.site][0]).abs().max()) > 1e-3


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_joint_blocks_and_grids(name, traces):
    trace = traces[name]
    video = name != "flux"
    for (site, _), rec in trace.records.items():
        if site.kind != "joint":
            continue
        assert rec.meta["blocks"] == BLOCKS[name], site
        image, text = BLOCKS[name]["image"], BLOCKS[name]["text"]
        assert torch.equal(rec.block("image", "text"), rec.probs[:, :, image[0]:image[1], text[0]:text[1]])
        assert rec.meta["grid"] == ([6, 4] if video else [3, 4])
        assert rec.meta.get("video_grid") == ([2, 3, 4] if video else None)
    n_text = 5
    first = "text" if BLOCKS[name]["text"][0] == 0 else "latent"
    assert trace.tokens.spans[0].modality == first
    assert sum(s.end - s.start for s in trace.tokens.spans) == n_text + (24 if video else 12)
    assert trace.tokens.grid == ((6, 4) if video else (3, 4))


def test_flux_grid_comes_from_img_ids(adapters):
    adapter = adapters["flux"]
    inputs = adapter.sample_inputs()
    assert adapter.read_layout((), inputs).grid == (3, 4)
    transposed = dict(inputs, img_ids=image_ids(4, 3))  # 12 tokens in a 4 x 3 grid: the ids decide
    assert adapter.read_layout((), transposed).grid == (4, 3)
    kontext = dict(inputs, img_ids=torch.cat([image_ids(2, 3), image_ids(2, 3) + torch.tensor([1.0, 0, 0])]))
    trace = attnscope.capture(adapter, kontext)  # two images' tokens: no single grid, blocks still right
    rec = trace.get(Site("flux.double", 0, "joint"))
    assert "grid" not in rec.meta and rec.meta["blocks"] == BLOCKS["flux"]


@pytest.mark.parametrize("name", ["wan", "wan_i2v"])
def test_wan_self_and_cross_sites(name, traces):
    n_text = 512 if name == "wan_i2v" else 5
    for (site, _), rec in traces[name].records.items():
        assert rec.probs.shape[-2:] == ((24, n_text) if site.kind == "cross" else (24, 24))
        assert rec.meta["video_grid"] == [2, 3, 4] and rec.meta["grid"] == [6, 4]
        assert "blocks" not in rec.meta
    assert [(s.modality, s.start, s.end) for s in traces[name].tokens.spans] == [("text", 0, n_text)]


def test_hunyuan_padded_text_keys_get_no_mass(traces):
    trace = traces["hunyuan_video"]  # second prompt: text tokens 3 and 4 are padding
    for site in trace.sites:
        probs = trace.get(site).probs
        if site.kind == "joint":
            assert float(probs[1, :, :, 24 + 3:].abs().max()) == 0.0
            assert float(probs[0, :, :, 24 + 3:].min()) > 0.0
        else:  # refiner: real queries see real keys; padded queries see key 0 only (the model's own mask)
            assert "grid" not in trace.get(site).meta
            assert float(probs[1, :, :3, 3:].abs().max()) == 0.0
            assert torch.allclose(probs[1, :, 3:, 0], torch.ones(()))


def test_statistics_and_rows_stream_through_the_side_channel(adapters, references):
    adapter = adapters["hunyuan_video"]
    trace = attnscope.capture(adapter, adapter.sample_inputs(), stats=("entropy",))
    site = Site("hunyuan_video.double", 0, "joint")
    probs = references["hunyuan_video"][site][0]
    want = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
    assert torch.allclose(trace.get(site).stats["entropy"].float(), want, atol=1e-4)


def _targets(name: str, adapter) -> list:
    """(layer as apply_plan numbers it, module, head): the first and the last attention module; for Wan I2V the
    self-attention ones (its cross-attention edit is the known issue below)."""
    projections = output_projections(adapter.module)
    if name == "wan_i2v":
        projections = [p for p in projections if not p.attention.is_cross_attention]
    return [(projections[0].layer, projections[0].attention, 0),
            (projections[-1].layer, projections[-1].attention, projections[-1].n_heads - 1)]


def _probs_edit(heads: list, factor: float):
    def edit(attn, probs):
        probs = probs.clone()
        probs[:, heads] = probs[:, heads] * factor
        return probs
    return edit


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize("mode", ["zero", "rescale", "uniform"])
def test_head_edits_equal_reference_edits(name, mode, adapters):
    adapter = adapters[name]
    targets = _targets(name, adapter)
    plan = InterventionPlan(HeadSet([(layer, head) for layer, _, head in targets]), mode,
                            scale=2.5 if mode == "rescale" else None)
    clean = _run(adapter)
    with apply_plan(adapter.module, plan):
        ours = _run(adapter)
    edits = {}
    for _, module, head in targets:
        if mode == "uniform":
            edits[id(module)] = (lambda attn, logits, h=head: uniform_logits(attn, logits, [h]), None)
        else:
            edits[id(module)] = (None, _probs_edit([head], 0.0 if mode == "zero" else 2.5))
    with _reference_processors(adapter, edits):
        want = _run(adapter)
    scale = max(1.0, float(want.abs().max()))
    assert float((ours - clean).abs().max()) > 1e-4  # the edit is visible
    assert float((ours - want).abs().max()) < ATOL * scale, mode


def test_wan_i2v_cross_attention_edit(adapters):
    """Wan I2V's attn2 runs the image-context softmax first: the edit skips it (the adapter's skip_calls), as
    capture does, and edits the text cross-attention."""
    adapter = adapters["wan_i2v"]
    proj = [p for p in output_projections(adapter.module) if p.attention.is_cross_attention][0]
    with apply_plan(adapter.module, InterventionPlan(HeadSet([(proj.layer, 0)]), "zero")):
        ours = _run(adapter)
    with _reference_processors(adapter, {id(proj.attention): (None, _probs_edit([0], 0.0))}):
        want = _run(adapter)
    assert float((ours - want).abs().max()) < ATOL * max(1.0, float(want.abs().max()))


def test_backends_that_skip_torch_sdpa_are_refused(adapters):
    adapter = adapters["flux"]
    module = adapter.module.transformer_blocks[0].attn
    module.processor._attention_backend = "flash"
    try:
        with pytest.raises(UnsupportedAttentionError, match="backend"):
            attnscope.capture(adapter, adapter.sample_inputs())
    finally:
        module.processor._attention_backend = None
    assert torch.nn.functional.scaled_dot_product_attention is diffusers_common._PATCH["sdpa"] or \
        diffusers_common._PATCH["count"] == 0
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in adapter.module.modules())


def test_eager_path_restores_processors_after_an_error(adapters):
    adapter = adapters["cogvideox"]
    processors = [m.processor for _, m, _ in adapter._table()]
    recorder = Recorder(CaptureRequest(patterns=True))
    with pytest.raises(RuntimeError, match="boom"):
        with adapter.instrument(recorder, implementation="eager"):
            raise RuntimeError("boom")
    assert [m.processor for _, m, _ in adapter._table()] == processors
    assert diffusers_common._PATCH["count"] == 0
