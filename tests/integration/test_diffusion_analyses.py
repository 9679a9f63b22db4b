"""Diffusion cross-attention analyses (DAAM, IoU, concept maps, HRV, ordered weakening) on tiny pipelines.

Oracles: a plain loop transcription of DAAM over a full capture; hand-built traces with known maps (IoU,
overlap, retention); a brute-force HRV from the queries recorded by forward hooks on ``to_q`` and keys computed
here from the text encoder; a planted PixArt head that can only prefer one concept.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import attnscope
from attnscope import Site
from attnscope.circuits.concept_maps import concept_overlap, concept_retention
from attnscope.circuits.daam import binary_mask, daam_from_trace, daam_maps, mask_iou
from attnscope.circuits.daam_segmentation import best_aggregation, daam_iou
from attnscope.circuits.hrv import head_relevance
from attnscope.circuits.hrv_weakening import ordered_weakening, weakening_plan
from attnscope.errors import InputError
from attnscope.probes.adapter import adapter_for
from attnscope.probes.trace import AttentionTrace, SiteRecord
from attnscope.probes.tokens import TokenInfo
from tiny_diffusion import BUILDERS, RED, call_kwargs, run_inputs

PROMPTS = ["a red cat", "a big red dog"]


@pytest.fixture(scope="module")
def pipes() -> dict:
    return {name: build() for name, build in BUILDERS.items()}


def reference_daam(trace, positions, size, mode="bicubic", heads=None, token_reduce="mean"):
    """DAAM written out: loop over steps, text sites, heads and tokens; sum steps, mean (site, head) maps."""
    sites = [s for s in trace.sites if s.kind in ("cross", "joint")]
    words = list(positions[0])
    batch = trace.get(sites[0], trace.steps(sites[0])[0]).probs.shape[0]
    total = torch.zeros(batch, len(words), *size)
    n_maps = 0
    for site in sites:
        for step in trace.steps(site):
            rec = trace.get(site, step)
            probs = rec.probs.double()
            if site.kind == "joint":
                (i0, i1), (t0, t1) = rec.meta["blocks"]["image"], rec.meta["blocks"]["text"]
                probs = probs[:, :, i0:i1, t0:t1]
            gh, gw = rec.meta["grid"]
            for h in heads if heads is not None else range(probs.shape[1]):
                n_maps += step == trace.steps(site)[0]
                for b in range(batch):
                    for j, word in enumerate(words):
                        toks = []
                        for p in positions[b][word]:
                            m = probs[b, h, :, p].reshape(1, 1, gh, gw).float()
                            kw = {} if mode == "nearest" else {"align_corners": False}
                            toks.append(F.interpolate(m, size=size, mode=mode, **kw)[0, 0].clamp(min=0))
                        if toks:
                            stacked = torch.stack(toks)
                            total[b, j] += stacked.sum(0) if token_reduce == "sum" else stacked.mean(0)
    return total / n_maps


@pytest.mark.parametrize("name", list(BUILDERS))
def test_daam_equals_a_plain_transcription(pipes, name):
    pipe = pipes[name]
    result = daam_maps(pipe, PROMPTS, ["red", "cat"], pipeline_kwargs=call_kwargs(name), num_inference_steps=2)
    assert result.positions[0]["red"] == RED[name] and result.positions[1]["cat"] == []
    full = attnscope.capture(pipe, run_inputs(name, PROMPTS))  # every key column, the standard capture
    grid = full.tokens.grid
    expected = reference_daam(full, result.positions, grid)
    assert result.maps.shape == (2, 2, *grid)
    torch.testing.assert_close(result.maps, expected, atol=1e-6, rtol=1e-5)
    assert float(result.maps[1, 1].abs().max()) == 0.0  # "cat" is not in the second prompt
    assert float(result.maps[0].min()) >= 0 and float(result.maps[0].max()) > 0
    # other controls, on the full trace: nearest upsampling to a larger size, one head, token sum
    opts = dict(size=(2 * grid[0], 2 * grid[1]), upsample="nearest", heads=[1], token_reduce="sum")
    other = daam_from_trace(full, result.positions, **opts)
    expected = reference_daam(full, result.positions, opts["size"], "nearest", [1], "sum")
    torch.testing.assert_close(other.maps, expected, atol=1e-6, rtol=1e-5)
    table = result.to_table()
    assert len(table) == result.maps.numel() and set(table.df["word"]) == {"red", "cat"}


def test_daam_image_size_resolutions_and_bad_words(pipes):
    pipe = pipes["unet"]
    kwargs = call_kwargs("unet")
    image = daam_maps(pipe, "a red cat", ["red"], size="image", pipeline_kwargs=kwargs)
    assert image.maps.shape == (1, 1, 16, 16)  # 8x8 latent, VAE factor 2
    low = daam_maps(pipe, "a red cat", ["red"], resolutions=[4], pipeline_kwargs=kwargs)
    sites = {k for k, _ in low.trace.records}
    by_level = daam_from_trace(low.trace, low.positions, sites=[s for s in sites if s.tower == "unet.mid"])
    torch.testing.assert_close(low.maps, by_level.maps)  # only the mid block has the 4x4 level
    with pytest.raises(InputError):
        daam_maps(pipe, "a red cat", ["zebra"], pipeline_kwargs=kwargs)
    with pytest.raises(InputError):
        daam_maps(pipe, "a red cat", ["red"], upsample="area", pipeline_kwargs=kwargs)


def _planted_trace(maps_by_key: dict, grid=(4, 4)) -> AttentionTrace:
    """Records whose single text column holds ``maps_by_key[(site, step)]`` (a [h, w] map)."""
    records = []
    for (site, step), m in maps_by_key.items():
        probs = m.reshape(1, 1, -1, 1).float()
        records.append(SiteRecord(site=site, step=step, probs=probs, n_query=probs.shape[2], n_key=1,
                                  meta={"grid": list(grid)}))
    return AttentionTrace(records, tokens=TokenInfo(grid=grid))


def test_iou_per_layer_and_step_finds_the_planted_aggregation():
    a, b = Site("unet.up.1", 0, "cross"), Site("unet.up.1", 1, "cross")
    target = torch.zeros(4, 4, dtype=torch.bool)
    target[:2, :2] = True
    exact, off = target.float(), torch.rot90(target, 2).float()  # off: the opposite corner
    trace = _planted_trace({(a, 0): exact, (a, 1): exact * 0.5, (b, 0): off, (b, 1): off})
    result = daam_from_trace(trace, {"cat": [0]}, upsample="nearest")
    table = daam_iou(result, target[None, None])
    df = table.df.set_index(["site", "step"])["value"]
    assert df[(str(a), 0)] == 1.0 and df[(str(a), -1)] == 1.0 and df[(str(b), 0)] == 0.0
    assert df[("all", -1)] == 0.5 and df[("all", 0)] == 0.5  # both corners pass 0.4 x max: 4 / 8
    assert best_aggregation(table) == {"site": str(a), "step": 0, "iou": 1.0}
    # the helpers against their definitions
    heat = torch.tensor([[0.0, 0.5], [0.39, 1.0]])
    assert binary_mask(heat).tolist() == [[False, True], [False, True]]
    assert binary_mask(heat, 0.45, relative=False).tolist() == [[False, True], [False, True]]
    pred, truth = torch.tensor([[1, 1], [0, 0]]).bool(), torch.tensor([[1, 0], [1, 0]]).bool()
    assert float(mask_iou(pred, truth)) == pytest.approx(1 / 3)
    assert math.isnan(float(mask_iou(pred & False, truth & False)))


def test_bicubic_overshoot_is_clamped_and_token_mean_is_linear():
    site = Site("unet.up.1", 0, "cross")
    hot = torch.zeros(4, 4)
    hot[1, 1] = 1.0  # a single hot pixel: bicubic upsampling rings below zero around it
    probs = torch.stack([hot.reshape(-1), torch.full((16,), 0.5)], -1)[None, None]
    trace = AttentionTrace([SiteRecord(site=site, step=0, probs=probs, n_query=16, n_key=2, meta={"grid": [4, 4]})],
                           tokens=TokenInfo(grid=(4, 4)))
    raw = daam_from_trace(trace, {"w": [0]}, size=(8, 8), clamp=False).maps
    assert float(raw.min()) < -1e-3
    clamped = daam_from_trace(trace, {"w": [0]}, size=(8, 8)).maps
    torch.testing.assert_close(clamped, raw.clamp_min(0))
    both = daam_from_trace(trace, {"w": [0, 1]}, size=(8, 8)).maps  # constant 0.5 column upsamples to 0.5
    torch.testing.assert_close(both, (raw.clamp_min(0) + 0.5) / 2)


def test_overlap_and_retention_on_planted_maps():
    site = Site("dit", 0, "cross")
    left, right = torch.zeros(4, 4), torch.zeros(4, 4)
    left[:, :2], right[:, 2:] = 1.0, 1.0
    records = []
    for step, (ma, mb) in enumerate([(left, right), (left, left * 0.5)]):
        probs = torch.stack([ma.reshape(-1), mb.reshape(-1)], -1)[None, None]
        records.append(SiteRecord(site=site, step=step, probs=probs, n_query=16, n_key=2, meta={"grid": [4, 4]}))
    trace = AttentionTrace(records, tokens=TokenInfo(grid=(4, 4)))
    positions = {"cat": [0], "dog": [1]}
    overlap = concept_overlap(trace, positions, upsample="nearest").df
    assert overlap["value"].tolist() == [0.0, 1.0]  # disjoint, then identical after max-normalisation
    ret = concept_retention(trace, positions, upsample="nearest").df.set_index(["metric", "step", "word"])["value"]
    assert ret[("peak_retention", 1, "dog")] == pytest.approx(0.5) and ret[("peak_retention", 1, "cat")] == 1.0
    assert ret[("mass_retention", 0, "dog")] == 1.0
    assert ret[("mask_iou_prev", 1, "dog")] == 0.0 and ret[("mask_iou_prev", 1, "cat")] == 1.0


@pytest.mark.parametrize("name", list(BUILDERS))
def test_concept_maps_run_on_every_pipeline(pipes, name):
    result = daam_maps(pipes[name], ["a red cat", "a red dog"], ["red", "cat"],
                       pipeline_kwargs=call_kwargs(name, steps=3))
    overlap = concept_overlap(result).df
    assert overlap["step"].tolist() == [0, 0, 1, 1, 2, 2]
    assert overlap[overlap["batch"] == 0]["value"].between(0, 1).all()
    assert overlap[overlap["batch"] == 1]["value"].isna().all()  # no "cat" in the second prompt
    retention = concept_retention(result).df
    assert set(retention["metric"]) == {"peak_retention", "mass_retention", "mask_iou_prev"}
    assert (retention[(retention["step"] == 0) & (retention["batch"] == 0)]["value"] == 1.0).all()
    absent = retention[(retention["batch"] == 1) & (retention["word"] == "cat")]
    assert len(absent) and absent["value"].isna().all()


def brute_force_hrv(pipe, name, prompt, words, steps=2):
    """Counts from queries recorded on every cross-attention ``to_q`` and keys computed here."""
    den = pipe.unet if name == "unet" else pipe.transformer
    table = adapter_for(pipe).inner._table()  # only to name the modules: columns follow sorted sites
    modules = [(n, m) for n, m, site in sorted(table, key=lambda e: e[2]) if site.kind == "cross"]
    tok, enc = pipe.tokenizer, pipe.text_encoder
    pieces, spans = [], []
    for i, word in enumerate(words):
        ids = tok(word)["input_ids"]
        hidden = enc(torch.tensor([ids]))[0][0]
        keep = [j for j, t in enumerate(ids) if t not in tok.all_special_ids]
        lead = [0] if i == 0 and ids[0] == tok.bos_token_id else []
        start = sum(len(p) for p in pieces)
        spans.append(list(range(start + len(lead), start + len(lead) + len(keep))))
        pieces.append(hidden[lead + keep])
    emb = torch.cat(pieces)[None]
    if name == "pixart":
        emb = den.caption_projection(emb)
    seen: dict[str, list] = {n: [] for n, _ in modules}
    handles = [m.to_q.register_forward_hook(lambda mod, a, out, n=n: seen[n].append(out.detach()))
               for n, m in modules]
    try:
        with torch.no_grad():
            pipe(prompt, generator=torch.Generator().manual_seed(22), **call_kwargs(name, steps))
    finally:
        for h in handles:
            h.remove()
    order = {n: i for i, (n, _) in enumerate(modules)}
    counts = torch.zeros(len(words), sum(m.heads for _, m in modules))
    offsets = [sum(m.heads for _, m in modules[:i]) for i in range(len(modules))]
    for n, m in modules:
        d = m.to_q.out_features // m.heads
        keys = m.to_k(emb)[0].view(-1, m.heads, d)  # [token, head, d]
        for q in seen[n]:
            q = q[q.shape[0] // 2:]  # conditional half
            for b in range(q.shape[0]):
                for h in range(m.heads):
                    qh = q[b].view(q.shape[1], m.heads, d)[:, h]
                    p = torch.softmax(qh @ keys[:, h].T / math.sqrt(d), -1).mean(0)
                    counts[int(torch.stack([p[s].mean() for s in spans]).argmax()), offsets[order[n]] + h] += 1
    return counts


@pytest.mark.parametrize("name", ["unet", "pixart"])
def test_hrv_counts_equal_a_brute_force_recomputation(pipes, name):
    concepts = {"colour": ["red"], "animal": ["dog"], "shape": ["circle"]}
    hrv = head_relevance(pipes[name], ["a red cat"], concepts, num_inference_steps=2, guidance_scale=4.0,
                         pipeline_kwargs=call_kwargs(name))
    expected = brute_force_hrv(pipes[name], name, "a red cat", ["red", "dog", "circle"])
    assert torch.equal(hrv.counts, expected)
    vectors = hrv.vectors()
    used = hrv.counts.sum(1) > 0  # a concept that never wins has a zero vector
    torch.testing.assert_close(vectors.abs().sum(1), used.float() * len(hrv.heads))
    assert float(hrv.counts.sum()) == 2 * len(hrv.heads)  # every head votes once per step
    per_head = hrv.counts / hrv.counts.sum(0)
    expected = per_head / per_head.sum(1, keepdim=True) * len(hrv.heads)
    torch.testing.assert_close(vectors, torch.nan_to_num(expected))
    table = hrv.to_table().df
    assert len(table) == 2 * 3 * len(hrv.heads) and set(table["metric"]) == {"hrv", "count"}


def test_planted_head_prefers_its_concept(pipes):
    pipe = BUILDERS["pixart"]()  # a fresh copy: its weights are edited
    attn = pipe.transformer.transformer_blocks[0].attn2
    d = attn.to_q.out_features // attn.heads
    emb = []
    for word in ("red", "dog"):
        ids = pipe.tokenizer(word)["input_ids"]
        emb.append(pipe.transformer.caption_projection(pipe.text_encoder(torch.tensor([ids]))[0])[0, 0])
    v, mid = emb[0] - emb[1], (emb[0] + emb[1]) / 2
    u = torch.zeros(d)
    u[0] = 1.0
    with torch.no_grad():  # head 0: constant query u; key of a token t = 50 * u * v.(t - mid): red >> dog
        attn.to_q.weight[:d] = 0
        attn.to_q.bias[:d] = u
        attn.to_k.weight[:d] = 50 * torch.outer(u, v) / v.norm() ** 2
        attn.to_k.bias[:d] = -50 * u * (v @ mid) / v.norm() ** 2
    hrv = head_relevance(pipe, ["a big cat", "a dog"], {"colour": ["red"], "animal": ["dog"]},
                         guidance_scale=4.0, pipeline_kwargs=call_kwargs("pixart", steps=3))
    column = hrv.heads.index((Site("dit", 0, "cross"), 0))
    assert hrv.counts[:, column].tolist() == [6.0, 0.0]  # 2 prompts x 3 steps, all on "colour"
    assert hrv.ranking("colour")[0] == (Site("dit", 0, "cross"), 0)


@pytest.mark.parametrize("name", ["unet", "pixart", "sd3"])
def test_ordered_weakening_curve(pipes, name):
    pipe = pipes[name]
    hrv = head_relevance(pipe, ["a red cat"], {"colour": ["red"], "animal": ["dog"]}, num_inference_steps=2,
                         guidance_scale=4.0, pipeline_kwargs=call_kwargs(name))
    n = len(hrv.heads)
    kwargs = {k: v for k, v in call_kwargs(name).items() if k not in ("num_inference_steps", "guidance_scale")}
    scorer = lambda images: float(images.double().mean())  # noqa: E731
    table = ordered_weakening(pipe, ["a red cat"], hrv, "colour", "red", scorer, ks=(0, 2, n), seed=3,
                              num_inference_steps=2, guidance_scale=4.0, output_type="latent",
                              pipeline_kwargs=kwargs).df
    score = table.set_index(["order", "k"])["value"]
    plain = pipe("a red cat", generator=torch.Generator().manual_seed(3), num_inference_steps=2, guidance_scale=4.0,
                 **dict(kwargs, output_type="latent")).images
    assert score[("MoRHF", 0)] == score[("LeRHF", 0)] == scorer(plain)  # k = 0 edits nothing
    assert score[("MoRHF", n)] == score[("LeRHF", n)]  # all heads: the same head set
    assert score[("MoRHF", 2)] != score[("MoRHF", 0)]  # weakening two heads changes the image
    assert table["heads"].iloc[1].count("joint" if name == "sd3" else "cross") == 2
    plan = weakening_plan(hrv.ranking("colour")[:3], [2, 3], -2.0)
    assert sum(len(e.heads) for e in plan.edits) == 3 and all(e.factor == -2.0 for e in plan.edits)


def test_dimension_annotations_hold():
    from beartype import beartype
    from jaxtyping import jaxtyped

    from attnscope.circuits.daam import normalize
    from attnscope.circuits.hrv import concept_keys

    def check(fn):
        return jaxtyped(typechecker=beartype)(fn)

    maps = torch.rand(2, 3, 4, 5)
    assert check(normalize)(maps, "words").shape == (2, 3, 4, 5)
    assert check(binary_mask)(maps).shape == (2, 3, 4, 5)
    assert check(mask_iou)(maps > 0.5, maps > 0.2).shape == (2, 3)
    attn = BUILDERS["pixart"]().transformer.transformer_blocks[0].attn2
    assert check(concept_keys)(attn, torch.randn(1, 3, attn.to_k.in_features)).shape == (attn.heads, 3, 4)
    with pytest.raises(Exception):
        check(normalize)(torch.rand(3, 4, 5), "max")
