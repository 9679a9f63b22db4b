"""``preset="daam"`` against an independent transcription of DAAM's reference code on the same captured maps.

Reference: castorini/daam, commit 09564e048cf5ffc1523aa0605736e7f178ca505a (files ``daam/trace.py``,
``daam/heatmap.py``, ``daam/hook.py``, ``daam/utils.py``). ``daam_reference`` below re-states its aggregation in
plain torch, in its own order (per (factor, layer, head) key: sum the raw maps over denoising steps, then
upsample, clamp, mean over keys, keep the prompt's rows, normalise), on a capture of every text column
(``attnscope.capture``), while the code under test runs its own capture of only the columns it needs. A variant
flag clamps every step's map instead (our ``clamp="per_map"``), so the tests can tell the two rules apart on maps
where bicubic upsampling undershoots zero.
"""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import attnscope
from attnscope import Site
from attnscope.circuits.daam import (DAAM_FACTORS, DaamOptions, aggregate, daam_from_trace, daam_maps,
                                     daam_prompt_positions, daam_size, site_step_maps)
from attnscope.circuits._diffusion import word_positions
from attnscope.errors import AnalysisError, InputError
from attnscope.probes.adapters.diffusers_pipeline import tiny_sd_pipeline
from attnscope.probes.adapters.tiny_pipelines import tiny_pixart_pipeline
from attnscope.probes.tokens import TokenInfo
from attnscope.probes.trace import AttentionTrace, SiteRecord
from tiny_diffusion import call_kwargs, run_inputs

PROMPT, WORDS = "a red cat", ["red", "cat"]


def daam_located(sites) -> list[Site]:
    """hook.py L106-120: ``attn2`` of every transformer block of the CrossAttn up blocks, then the down blocks; the
    mid block only when ``locate_middle_block``, which trace.py L34-35 sets only for saving or loading heads."""
    cross = [s for s in sites if s.kind == "cross"]
    return ([s for s in cross if s.tower.startswith("unet.up.")]
            + [s for s in cross if s.tower.startswith("unet.down.")])


def daam_merge_indices(tokenizer, prompt: str, word: str) -> list[int]:
    """utils.py L73-91: token strings of the lower-cased prompt and word without ``</w>``, every match, +1 (SOS)."""
    tokens = [t.replace("</w>", "") for t in tokenizer.tokenize(prompt.lower())]
    search = [t.replace("</w>", "") for t in tokenizer.tokenize(word.lower())]
    starts = [i for i in range(len(tokens)) if tokens[i:i + len(search)] == search]
    return [s + j + 1 for s in starts for j in range(len(search))]


def daam_reference(trace, n_prompt_tokens: int, side: int, normalize: bool = False, factors=None,
                   clamp_each_step: bool = False, item: int = 0) -> torch.Tensor:
    """DAAM's per-token maps ``[n_prompt_tokens + 2, side, side]`` of batch item ``item``.

    side: sqrt(latent_hw) (trace.py L32-33, L109). The records hold the conditional half of the CFG batch only
    (the adapter's rule), which is what trace.py L240 keeps. The 77-key test of trace.py L289 is left out: the
    tiny tokenizer has 16 keys.
    """
    latent_hw = side * side
    raw: dict[tuple[int, int, int], torch.Tensor] = {}
    per_step: dict[tuple[int, int, int], list[torch.Tensor]] = {}
    for layer, site in enumerate(daam_located(trace.sites)):
        for step in trace.steps(site):
            probs = trace.get(site, step).probs[item].float()  # [head, h*w, tokens]
            factor = int(math.sqrt(latent_hw // probs.shape[1]))  # trace.py L285
            if factor == 8:  # trace.py L289
                continue
            h = w = int(math.sqrt(probs.shape[1]))  # trace.py L233
            maps = probs.permute(0, 2, 1).reshape(probs.shape[0], probs.shape[2], h, w)  # (heads, tokens, h, w)
            for head in range(maps.shape[0]):
                key = (factor, layer, head)
                raw[key] = raw.get(key, 0.0) + maps[head]  # heatmap.py L153-156: a sum over time per key
                per_step.setdefault(key, []).append(maps[head])
    kept = set(factors) if factors is not None else {0, 1, 2, 4, 8, 16, 32, 64}  # trace.py L103-106
    merged = []
    for key, heat in raw.items():  # trace.py L112-116: bicubic to (side, side), then clamp (undershoot)
        if key[0] not in kept:
            continue
        if clamp_each_step:  # not DAAM: clamp every step's map, then sum (attnscope's clamp="per_map")
            merged.append(sum(F.interpolate(m.unsqueeze(1), size=(side, side), mode="bicubic").clamp(min=0)
                              for m in per_step[key]))
        else:
            merged.append(F.interpolate(heat.unsqueeze(1), size=(side, side), mode="bicubic").clamp_(min=0))
    if not merged:
        raise RuntimeError("No heat maps found.")  # trace.py L118-124
    maps = torch.stack(merged, 0).mean(0)[:, 0]  # trace.py L119, L126: mean over (factor, layer, head)
    maps = maps[:n_prompt_tokens + 2]  # trace.py L127: SOS, the prompt, one EOS
    if normalize:  # trace.py L129-130
        maps = maps / (maps[1:-1].sum(0, keepdim=True) + 1e-6)
    return maps


def reference_words(pipe, token_maps: torch.Tensor, words=WORDS, prompt=PROMPT) -> torch.Tensor:
    """heatmap.py L121-123: a word's map is the mean of its tokens' maps. -> ``[1, word, side, side]``."""
    return torch.stack([token_maps[daam_merge_indices(pipe.tokenizer, prompt, w)].mean(0) for w in words])[None]


def sharpened_pipeline():
    """The tiny SD pipeline with cross-attention queries x 10: peaked maps whose bicubic upsampling undershoots."""
    pipe = tiny_sd_pipeline()
    with torch.no_grad():
        for name, module in pipe.unet.named_modules():
            if name.endswith("attn2"):
                module.to_q.weight.mul_(10.0)
    return pipe


@pytest.fixture(scope="module")
def sharp():
    pipe = sharpened_pipeline()
    full = attnscope.capture(pipe, run_inputs("unet", [PROMPT], **call_kwargs("unet", steps=3)))
    return pipe, full


def _n_tokens(pipe) -> int:
    return len(pipe.tokenizer.tokenize(PROMPT))


def test_word_and_prompt_positions_follow_daam(sharp):
    pipe, _ = sharp
    for word in WORDS:
        assert word_positions(pipe, PROMPT, word) == daam_merge_indices(pipe.tokenizer, PROMPT, word)
    assert daam_prompt_positions(pipe, [PROMPT]) == [list(range(1, _n_tokens(pipe) + 1))]
    # a documented difference: DAAM matches strings without "</w>", so "a" also matches inside "cat" here
    assert daam_merge_indices(pipe.tokenizer, PROMPT, "a") == [1, 6] and word_positions(pipe, PROMPT, "a") == [1]


@pytest.mark.parametrize("size", [16, 32])  # 16: the 4x4 mid block has factor 4, so only the locator drops it
@pytest.mark.parametrize("normalize", [False, True])
def test_preset_daam_equals_the_transcription(sharp, size, normalize):
    pipe, full = sharp
    extra = {"normalize": "prompt_tokens"} if normalize else {}
    result = daam_maps(pipe, PROMPT, WORDS, preset="daam", size=(size, size),
                       pipeline_kwargs=call_kwargs("unet", steps=3), **extra)
    n = _n_tokens(pipe)
    assert result.trace.get(daam_located(full.sites)[0], 0).meta["key_positions"] == list(range(1, n + 1))
    expected = reference_words(pipe, daam_reference(full, n, size, normalize=normalize))
    torch.testing.assert_close(result.maps, expected, atol=1e-6, rtol=1e-5)
    # the same rule from the full trace, spelled as attnscope options
    spelled = daam_from_trace(full, result.positions, size=(size, size), clamp="after_sum", skip_mid=True,
                              factors=DAAM_FACTORS, prompt_positions=list(range(1, n + 1)), **extra)
    torch.testing.assert_close(spelled.maps, expected, atol=1e-6, rtol=1e-5)


def test_each_daam_choice_matters_on_the_pipeline(sharp):
    pipe, full = sharp
    n, side = _n_tokens(pipe), 16
    positions = {w: word_positions(pipe, PROMPT, w) for w in WORDS}
    daam = daam_from_trace(full, positions, preset="daam", size=(side, side)).maps
    torch.testing.assert_close(daam, reference_words(pipe, daam_reference(full, n, side)), atol=1e-6, rtol=1e-5)

    def rel(a):
        return float((a - daam).abs().max() / daam.abs().max())

    # clamp per step (attnscope) = the transcription's variant, and differs from DAAM where maps undershoot
    per_map = daam_from_trace(full, positions, preset="daam", size=(side, side), clamp="per_map").maps
    variant = reference_words(pipe, daam_reference(full, n, side, clamp_each_step=True))
    torch.testing.assert_close(per_map, variant, atol=1e-6, rtol=1e-5)
    assert rel(per_map) > 1e-2 and bool((per_map >= daam - 1e-6).all())  # clamp(a) + clamp(b) >= clamp(a + b)
    # keeping the mid block (attnscope) changes the maps
    assert rel(daam_from_trace(full, positions, preset="daam", size=(side, side), skip_mid=False).maps) > 1e-2
    # the old default at the same size differs; with DAAM's choices spelled out it is DAAM
    assert rel(daam_from_trace(full, positions, size=(side, side)).maps) > 1e-2
    # normalising over the requested words (attnscope) vs over every prompt token (DAAM's normalize=True)
    words = daam_from_trace(full, positions, preset="daam", size=(side, side), normalize="words").maps
    torch.testing.assert_close(words, daam / (daam.sum(1, keepdim=True) + 1e-6))
    prompt = daam_from_trace(full, positions, preset="daam", size=(side, side), normalize="prompt_tokens",
                             prompt_positions=list(range(1, n + 1))).maps
    expected = reference_words(pipe, daam_reference(full, n, side, normalize=True))
    torch.testing.assert_close(prompt, expected, atol=1e-6, rtol=1e-5)
    assert float((words - prompt).abs().max()) > 0.05


def test_daam_size_rule_and_its_factor_filter_on_the_tiny_pipeline(sharp):
    pipe, full = sharp

    def reference_side(sample_size, vae_scale_factor):  # trace.py L32-33, L109
        h = sample_size * vae_scale_factor
        return int(math.sqrt(4096 if h == 512 or h == 1024 else 9216))

    for sample, vsf in [(64, 8), (96, 8), (128, 8), (32, 8), (8, 2)]:
        fake = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(sample_size=sample)), vae_scale_factor=vsf)
        assert daam_size(fake) == (reference_side(sample, vsf),) * 2
    assert daam_size(pipe) == (96, 96)  # 16 px images
    # at 96x96 every 8x8 map of the tiny UNet has factor int(sqrt(9216 // 64)) = 12: DAAM keeps none, nor do we
    with pytest.raises(RuntimeError):
        daam_reference(full, _n_tokens(pipe), 96)
    with pytest.raises(AnalysisError, match="no maps left"):
        daam_maps(pipe, PROMPT, WORDS, preset="daam", pipeline_kwargs=call_kwargs("unet"))
    with pytest.raises(InputError, match="UNet"):  # DAAM hooks UNets only (hook.py L95-127)
        daam_maps(tiny_pixart_pipeline(), PROMPT, ["red"], preset="daam", pipeline_kwargs=call_kwargs("pixart"))


def _sd_like_trace(seed: int = 0) -> tuple[AttentionTrace, dict]:
    """Random softmax maps on SD 1.x's cross-attention grids at 512 px, plus an 8x8 up site and a 128x128 site."""
    gen = torch.Generator().manual_seed(seed)
    grids = {("unet.down.0", 64), ("unet.down.1", 32), ("unet.down.2", 16), ("unet.mid", 8), ("unet.up.0", 8),
             ("unet.up.1", 16), ("unet.up.2", 32), ("unet.up.3", 64), ("unet.up.4", 128)}
    records = []
    for tower, g in sorted(grids):
        for step in range(2):
            logits = torch.randn(1, 2, g * g, 6, generator=gen) * 3
            records.append(SiteRecord(site=Site(tower, 0, "cross"), step=step, probs=logits.softmax(-1),
                                      n_query=g * g, n_key=6, meta={"grid": [g, g]}))
    trace = AttentionTrace(records, tokens=TokenInfo(grid=(64, 64)), provenance={"daam_size": [64, 64]})
    return trace, {"red": [1, 2], "cat": [3]}


def test_factor_filter_on_sd_geometry():
    trace, positions = _sd_like_trace()
    n = 4  # prompt tokens at positions 1..4; 0 is SOS, 5 the EOS
    result = daam_from_trace(trace, positions, preset="daam", normalize="prompt_tokens", prompt_positions=[1, 2, 3, 4])
    assert result.maps.shape == (1, 2, 64, 64)  # size "daam" from the trace's provenance
    token_maps = daam_reference(trace, n, 64, normalize=True)
    expected = torch.stack([token_maps[positions[w]].mean(0) for w in positions])[None]
    torch.testing.assert_close(result.maps, expected, atol=1e-6, rtol=1e-5)
    # the factor rule drops the 8x8 up site (factor 8) and keeps the 128x128 one (factor 0)
    spelled = daam_from_trace(trace, positions, preset="daam", factors=None, normalize="prompt_tokens",
                              prompt_positions=[1, 2, 3, 4])
    assert float((spelled.maps - result.maps).abs().max()) > 1e-4
    without_up0 = [s for s in trace.sites if s.tower != "unet.up.0"]
    torch.testing.assert_close(daam_from_trace(trace, positions, preset="daam", factors=None, sites=without_up0,
                                               normalize="prompt_tokens", prompt_positions=[1, 2, 3, 4]).maps,
                               result.maps)


def test_clamp_after_the_step_sum_on_a_planted_undershoot():
    site = Site("unet.up.1", 0, "cross")
    hot = torch.zeros(4, 4)
    hot[1, 1] = 1.0  # bicubic upsampling rings below zero around a single hot pixel
    records = [SiteRecord(site=site, step=t, probs=m.reshape(1, 1, 16, 1), n_query=16, n_key=1, meta={"grid": [4, 4]})
               for t, m in enumerate([hot, torch.full((4, 4), 0.5)])]
    trace = AttentionTrace(records, tokens=TokenInfo(grid=(4, 4)))
    up = F.interpolate(hot[None, None], size=(8, 8), mode="bicubic", align_corners=False)[0, 0]
    assert float(up.min()) < -1e-3
    after = daam_from_trace(trace, {"w": [0]}, size=(8, 8), clamp="after_sum").maps[0, 0]
    per_map = daam_from_trace(trace, {"w": [0]}, size=(8, 8), clamp="per_map").maps[0, 0]
    torch.testing.assert_close(after, (up + 0.5).clamp(min=0))  # = up + 0.5: the undershoot is filled in
    torch.testing.assert_close(per_map, up.clamp(min=0) + 0.5)


def test_subsets_of_a_daam_result_clamp_after_their_own_step_sum(sharp):
    pipe, full = sharp
    positions = {w: word_positions(pipe, PROMPT, w) for w in WORDS}
    result = daam_from_trace(full, positions, preset="daam", size=(16, 16))
    opts = DaamOptions(**result.options)
    maps, n_heads, _ = site_step_maps(full, result.positions, result.words, opts)
    torch.testing.assert_close(aggregate(maps, n_heads, opts), result.maps)
    step0 = aggregate(maps, n_heads, opts, [k for k in maps if k[1] == 0])
    torch.testing.assert_close(step0, daam_from_trace(full, positions, preset="daam", size=(16, 16), steps=[0]).maps)


def test_cli_preset_daam_writes_the_library_maps(tmp_path):
    from attnscope.cli import main

    folder = tmp_path / "tiny-sd"
    sharpened_pipeline().save_pretrained(str(folder))
    out = tmp_path / "maps.parquet"
    assert main(["heatmap", "--model", str(folder), "--prompt", PROMPT, "--word", "red", "--out", str(out),
                 "--steps", "2", "--preset", "daam", "--size", "grid", "--normalize", "prompt_tokens"]) == 0
    expected = daam_maps(attnscope.load(str(folder)), [PROMPT], ["red"], preset="daam", size="grid",
                         normalize="prompt_tokens", num_inference_steps=2).maps[0, 0]
    rows = attnscope.ResultTable.load(out).df.sort_values(["y", "x"])
    got = torch.tensor(rows["value"].to_numpy(), dtype=torch.float32).reshape(expected.shape)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert main(["heatmap", "--model", str(folder), "--prompt", PROMPT, "--word", "red", "--out", str(out),
                 "--steps", "1", "--preset", "daam"]) == 2  # DAAM's 96x96 keeps no map of this tiny UNet
