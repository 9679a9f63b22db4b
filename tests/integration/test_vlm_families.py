"""VLM families beyond LLaVA on tiny random-init models (the coverage catalogue's builders): LLaVA-NeXT (anyres
tiles), Qwen2-VL / Qwen2.5-VL (packed patches, M-RoPE, windowed vision attention), Idefics3 / SmolVLM (pixel
shuffle), Mllama (cross-attention layers, tiles), with LLaVA and PaliGemma as regressions.

References: text sites against the model's own ``output_attentions`` under eager attention (Mllama's tuple mixes
self- and cross-attention layers: split by ``cross_attention_layers``); vision sites, whose weights the models do
not return, against the weights the model's own ``eager_attention_forward`` computes, read by wrapping that
function (per image or window for Qwen, assembled here on the ``cu_seqlens`` the module receives).
"""

import contextlib
import sys

import pytest
import torch

import attnscope
from attnscope.errors import InputError
from attnscope.probes import validate
from attnscope.probes.adapter import Prepared
from attnscope.probes.adapters.hf_vlm import HFVisionLanguageAdapter, image_token_id
from attnscope.probes.coverage.catalogue import ARCHITECTURES

FAMILIES = ["llava", "paligemma", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm", "mllama"]
ATOL = 1e-5


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = ARCHITECTURES[name].builder()
        return cache[name]
    return get


def _adapter(model) -> HFVisionLanguageAdapter:
    adapter = attnscope.load(model)
    assert isinstance(adapter, HFVisionLanguageAdapter)
    return adapter


# ---- independent references ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def _eager(model):
    configs = [m.config for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")]
    saved = [(c, c._attn_implementation) for c in configs]
    for c in configs:
        c._attn_implementation = "eager"
    try:
        yield
    finally:
        for c, impl in saved:
            c._attn_implementation = impl


def _vision_modules(model, adapter):
    by_id = {id(m): m for m in model.modules()}
    return {site: by_id[mid] for mid, site in adapter._sites().items() if site.tower == "vision"}


def own_vision_weights(model, adapter, kwargs):
    """Site -> weights ``[batch, head, query, key]`` of one forward from the model's own eager attention function;
    chunks of a packed (``cu_seqlens``) module are placed on the block diagonal of its packed sequence."""
    modules = _vision_modules(model, adapter)
    site_of = {id(m): s for s, m in modules.items()}
    calls = {site: [] for site in modules}
    bounds = {site: [] for site in modules}
    patched = {}
    for module in modules.values():
        py_module = sys.modules[type(module).__module__]
        original = py_module.eager_attention_forward

        def recording(mod, *args, _original=original, **kw):
            out = _original(mod, *args, **kw)
            if id(mod) in site_of:
                calls[site_of[id(mod)]].append(out[1].detach().float())
            return out
        patched[py_module] = (original, recording)
    hooks = [m.register_forward_pre_hook(lambda mod, a, kw: bounds[site_of[id(mod)]].append(kw.get("cu_seqlens")),
                                         with_kwargs=True) for m in modules.values()]
    try:
        for py_module, (_, recording) in patched.items():
            py_module.eager_attention_forward = recording
        with _eager(model), torch.no_grad():
            model(**kwargs)
    finally:
        for py_module, (original, _) in patched.items():
            py_module.eager_attention_forward = original
        for h in hooks:
            h.remove()
    out = {}
    for site, chunks in calls.items():
        cu = bounds[site][0]
        if cu is None:
            assert len(chunks) == 1
            out[site] = chunks[0]
            continue
        n = int(cu[-1])
        full = torch.zeros(1, chunks[0].shape[1], n, n)
        assert len(chunks) == len(cu) - 1
        for chunk, a, b in zip(chunks, cu[:-1].tolist(), cu[1:].tolist()):
            full[..., a:b, a:b] = chunk
        out[site] = full
    return out


def own_text_weights(model, kwargs):
    """Site -> the model's own ``output_attentions`` weights; Mllama's cross-attention layers go to ``cross``."""
    with _eager(model), torch.no_grad():
        weights = model(**kwargs, output_attentions=True).attentions
    cross = set(getattr(model.config.text_config, "cross_attention_layers", None) or [])
    out, counters = {}, {"self": 0, "cross": 0}
    for index, w in enumerate(weights):
        kind = "cross" if index in cross else "self"
        out[attnscope.Site("text", counters[kind], kind)] = w.float()
        counters[kind] += 1
    return out


# ---- every family ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FAMILIES)
def test_capture_equals_the_models_own_eager_weights(models, name):
    model = models(name)
    adapter = _adapter(model)
    inputs = adapter.sample_inputs()
    assert inputs["input_ids"].shape[0] == 2 and inputs["attention_mask"][1, -1] == 0
    trace = attnscope.capture(model, inputs)
    assert set(trace.sites) == set(adapter.info().sites)
    assert {s.tower for s in trace.sites} == {"text", "vision"}
    kwargs = adapter.prepare(inputs).kwargs
    want = {**own_text_weights(model, kwargs), **own_vision_weights(model, adapter, kwargs)}
    assert set(want) == set(trace.sites)
    for site in trace.sites:
        assert trace.steps(site) == [0], site
        got = trace[site].probs
        assert got.shape == want[site].shape, site
        torch.testing.assert_close(got, want[site], atol=ATOL, rtol=0, msg=str(site))


@pytest.mark.parametrize("name", FAMILIES)
def test_validate_passes_with_bit_identical_outputs(models, name):
    report = validate(models(name))
    assert report.ok, str(report)
    assert report.output_bit_identical and report.attention_path == "sdpa"
    assert report.probs_max_diff < ATOL and report.n_sites == len(_adapter(models(name)).info().sites)


@pytest.mark.parametrize("name", FAMILIES)
def test_image_spans_are_the_image_token_positions(models, name):
    model = models(name)
    adapter = _adapter(model)
    prepared = adapter.prepare(adapter.sample_inputs())
    ids = prepared.kwargs["input_ids"][0]
    positions = (ids == image_token_id(model.config)).nonzero().flatten().tolist()
    assert positions and prepared.tokens.positions("image") == positions
    image_spans = [s for s in prepared.tokens.spans if s.modality == "image"]
    assert [(s.start, s.end) for s in image_spans] == [(positions[0], positions[-1] + 1)]  # one image, one run


@pytest.mark.parametrize("name", FAMILIES)
def test_wrong_number_of_image_tokens_is_an_input_error_with_a_fix(models, name):
    adapter = _adapter(models(name))
    inputs = adapter.sample_inputs()
    ids = inputs["input_ids"].clone()
    first = int((ids[0] == image_token_id(models(name).config)).nonzero()[0])
    ids[0, first] = 5  # one image token fewer
    with pytest.raises(InputError, match="image tokens do not match") as info:
        attnscope.capture(models(name), {**inputs, "input_ids": ids})
    assert info.value.fix and "token id" in info.value.fix and info.value.expected and info.value.got


# ---- family specifics ------------------------------------------------------------------------------------------------

def test_the_models_own_count_check_becomes_an_input_error(models):
    """A mismatch no recipe caught (here: the recipe bypassed) is raised by the model, and reported as input."""
    adapter = _adapter(models("llava_next"))
    prepared = adapter.prepare(adapter.sample_inputs())
    ids = prepared.kwargs["input_ids"].clone()
    ids[:, 2] = 5
    with pytest.raises(InputError, match="Image features and image tokens do not match"):
        adapter.run(Prepared({**prepared.kwargs, "input_ids": ids}, prepared.tokens))


def test_llava_next_token_count_follows_image_sizes(models):
    """anyres: an image whose size picks more tiles gets more tokens (the model's own packing, unpadding included)."""
    import transformers

    cfg = models("llava_next").config.to_dict()
    cfg["image_grid_pinpoints"] = [[16, 16], [16, 32], [32, 16]]
    torch.manual_seed(0)
    model = transformers.LlavaNextForConditionalGeneration(transformers.LlavaNextConfig(**cfg)).eval()
    adapter = _adapter(model)
    wide = torch.tensor([[10, 30]])  # best fit 16x32: base tile + 2 tiles, unpadded rows + newline column
    from attnscope.probes.adapters.hf_vlm_inputs import _next_tokens

    n = _next_tokens(model, wide)[0]
    ids = torch.tensor([[4, 5] + [image_token_id(model.config)] * n + [6]])
    inputs = {"input_ids": ids, "pixel_values": torch.randn(1, 3, 3, 16, 16), "image_sizes": wide}
    with torch.no_grad():
        model(**inputs)  # the model accepts exactly this count
    assert n != 36  # not the square image's count
    assert validate(adapter, inputs).ok


def test_missing_image_inputs_name_what_the_family_needs(models):
    qwen = _adapter(models("qwen2_vl"))
    inputs = qwen.sample_inputs()
    del inputs["image_grid_thw"]
    with pytest.raises(InputError, match="missing image_grid_thw"):
        qwen.prepare(inputs)
    idefics = _adapter(models("idefics3"))
    inputs = idefics.sample_inputs()
    with pytest.raises(InputError, match="pixel_values have the wrong shape") as info:
        idefics.prepare({**inputs, "pixel_values": inputs["pixel_values"][:, 0]})
    assert "pixel_values[:, None]" in info.value.fix
    with pytest.raises(InputError, match="image tokens without images"):
        idefics.prepare({"input_ids": inputs["input_ids"]})


def test_text_only_run_records_the_text_tower(models):
    adapter = _adapter(models("qwen2_vl"))
    ids = torch.tensor([[4, 5, 6, 7]])
    trace = attnscope.capture(models("qwen2_vl"), {"input_ids": ids})
    assert {s.tower for s in trace.sites} == {"text"} and not trace.tokens.positions("image")
    assert adapter.prepare({"input_ids": ids}).kwargs["mm_token_type_ids"].sum() == 0


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
def test_packed_vision_sites_are_block_diagonal_over_images_and_windows(models, name):
    """Two images of different sizes (8x8 and 4x4 patches); Qwen2.5-VL's windowed block splits the first image
    into 4 windows. One record per site over all 80 packed patches, no attention across blocks."""
    model = models(name)
    adapter = _adapter(model)
    grid = torch.tensor([[1, 8, 8], [1, 4, 4]])
    cfg = model.config
    start, end, image = cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.image_token_id
    ids = torch.tensor([[4, start] + [image] * 16 + [end, start] + [image] * 4 + [end, 5]])
    inputs = {"input_ids": ids, "pixel_values": torch.randn(80, 96, generator=torch.Generator().manual_seed(3)),
              "image_grid_thw": grid}
    with pytest.raises(InputError, match="one run per image"):  # the M-RoPE index takes one grid per run
        adapter.prepare({**inputs, "input_ids": torch.tensor([[4, start] + [image] * 20 + [end, 5]])})
    trace = attnscope.capture(model, inputs)
    want = own_vision_weights(model, adapter, adapter.prepare(inputs).kwargs)
    for layer in range(2):
        site = attnscope.Site("vision", layer)
        probs = trace[site].probs
        assert probs.shape == (1, 4, 80, 80) and trace.steps(site) == [0]
        torch.testing.assert_close(probs, want[site], atol=ATOL, rtol=0)
        assert float(probs[..., :64, 64:].abs().max()) == 0.0 and float(probs[..., 64:, :64].abs().max()) == 0.0
        torch.testing.assert_close(probs.sum(-1), torch.ones(1, 4, 80), atol=ATOL, rtol=0)
    windowed = trace[attnscope.Site("vision", 0)].probs[..., :64, :64]
    if name == "qwen2_5_vl":  # block 0 is windowed (16 patches per window), block 1 attends over the whole image
        assert float(windowed[..., :16, 16:].abs().max()) == 0.0
    else:
        assert float(windowed[..., :16, 16:].abs().max()) > 0.0
    assert validate(adapter, inputs).ok


def test_mllama_cross_attention_sites_and_inputs(models):
    model = models("mllama")
    adapter = _adapter(model)
    info = adapter.info()
    assert info.tower("text").kinds == ["cross", "self"] and info.tower("text").n_layers == 2
    assert info.tower("vision").n_layers == 3  # 2 local + 1 global layers, numbered in forward order
    inputs = adapter.sample_inputs()
    image_at = int((inputs["input_ids"][0] == image_token_id(model.config)).nonzero()[0])
    mask = inputs["cross_attention_mask"]
    assert mask.shape == (2, inputs["input_ids"].shape[1], 1, 1)
    assert mask[:, :image_at].sum() == 0 and bool((mask[:, image_at:] == 1).all())  # from the image token on
    completed = adapter.prepare({k: v for k, v in inputs.items()
                                 if k not in ("cross_attention_mask", "aspect_ratio_mask")}).kwargs
    assert torch.equal(completed["cross_attention_mask"], mask)
    assert torch.equal(completed["aspect_ratio_mask"], inputs["aspect_ratio_mask"])
    trace = attnscope.capture(model, inputs)
    cross = trace[attnscope.Site("text", 0, "cross")].probs
    n_vision = model.model.vision_model.num_patches
    assert cross.shape == (2, 4, inputs["input_ids"].shape[1], n_vision)  # text queries x vision-token keys


def test_tokens_per_image_is_refused_where_it_varies(models):
    with pytest.raises(InputError, match="no fixed number of image tokens"):
        _adapter(models("qwen2_vl")).tokens_per_image()
    assert _adapter(models("llava")).tokens_per_image() == 16
