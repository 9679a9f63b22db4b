"""Figure builders against independent computations: what each figure draws equals the numbers it was given
(pooled maxima, top-k entries, the trace's own probabilities, per-token values), and long inputs stay small."""

import numpy as np
import pandas as pd
import pytest
import torch

import attnscope
from attnscope import viz
from attnscope.errors import InputError, SiteError
from attnscope.probes.tokens import TokenInfo
from attnscope.probes.trace import AttentionTrace, SiteRecord


def _table(n_layers=3, n_heads=4, metric="m", scale=1.0):
    return attnscope.ResultTable.from_records(
        [{"analysis": "a", "layer": l, "head": h, "metric": metric, "value": scale * (10 * l + h)}
         for l in range(n_layers) for h in range(n_heads)]
        + [{"analysis": "a", "layer": -1, "head": -1, "metric": metric, "value": 999.0}])


def _trace(n=6, batch=2, heads=3, padding=True):
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(batch, heads, n, n), -1)
    strings = [[f"t{b}_{i}" for i in range(n)] for b in range(batch)]
    pad = [[1] * n, [1] * (n - 2) + [0, 0]] if padding else None
    recs = [SiteRecord(site=attnscope.Site("text", layer), probs=probs * (layer + 1) / (layer + 1), n_query=n,
                       n_key=n) for layer in range(2)]
    return AttentionTrace(recs, TokenInfo(strings=strings, padding=pad)), probs


def test_head_grid_values_customdata_and_dropped_aggregate_rows():
    fig = viz.head_grid(_table(), selected=(2, 1))
    z = np.asarray(fig.data[0].z)
    assert z.shape == (3, 4) and z[2, 3] == 23 and np.isfinite(z).all()  # the layer -1 row is not a head
    assert [list(c) for c in fig.data[0].customdata[1]] == [[1, h] for h in range(4)]
    assert fig.layout.shapes[0].x0 == 0.5 and fig.layout.shapes[0].y0 == 1.5  # outline around (2, 1)
    with pytest.raises(InputError):
        viz.head_grid(_table(), "other")


def test_head_grid_diff_is_b_minus_a_on_aligned_heads():
    a, b = _table(), _table(n_layers=4, scale=2.0)
    z = np.asarray(viz.head_grid_diff(a, b).data[0].z)
    assert z.shape == (4, 4)
    assert z[1, 2] == pytest.approx(12.0) and np.isnan(z[3]).all()  # layer 3 exists only in b


def test_pattern_from_trace_matches_probs_trims_padding_and_fuses():
    trace, probs = _trace()
    fig = viz.attention_pattern(trace, 1, 2, batch=1)
    z = np.asarray(fig.data[0].z)
    assert z.shape == (4, 4)  # two padding tokens cut away
    np.testing.assert_allclose(z, probs[1, 2, :4, :4].numpy(), rtol=1e-6)
    assert list(fig.layout.xaxis.ticktext) == [f"t1_{i}" for i in range(4)]
    fused = np.asarray(viz.attention_pattern(trace, 0, [0, 2], fusion="max").data[0].z)
    np.testing.assert_allclose(fused, torch.maximum(probs[0, 0], probs[0, 2]).numpy(), rtol=1e-6)
    with pytest.raises(SiteError):
        viz.attention_pattern(trace, 0, 7)


def test_pattern_of_a_subset_of_heads_and_rows_uses_model_numbers():
    probs = torch.softmax(torch.randn(1, 2, 3, 5), -1)
    rec = SiteRecord(site=attnscope.Site("text", 0), probs=probs, head_index=torch.tensor([3, 9]),
                     query_index=torch.tensor([2, 3, 4]), n_query=5, n_key=5)
    p = viz.trace_pattern(AttentionTrace([rec]), 0, 9)
    assert p.query_positions == [2, 3, 4]
    np.testing.assert_allclose(p.matrix, probs[0, 1].numpy())


def test_pooling_and_topk_against_numpy():
    rng = np.random.default_rng(0)
    m = rng.random((10, 7)).astype(np.float32)
    pooled, block = viz.pool_pattern(m, 3, "max")
    assert pooled.shape == (4, 3) and block == 3
    assert pooled[3, 2] == m[9:, 6:].max() and pooled[1, 1] == m[3:6, 3:6].max()
    mean, _ = viz.pool_pattern(m, 3, "mean")
    assert mean[3, 2] == pytest.approx(m[9:, 6:].mean()) and mean[0, 0] == pytest.approx(m[:3, :3].mean())
    rows, cols, values = viz.topk_sparsify(m, 2)
    for r in range(10):
        assert sorted(cols[rows == r].tolist()) == sorted(np.argsort(-m[r])[:2].tolist())
    np.testing.assert_array_equal(values, m[rows, cols])


def test_long_pattern_is_reduced_server_side():
    n = 4096
    probs = torch.rand(1, n, n, dtype=torch.float32)
    pooled = viz.attention_pattern(probs, max_side=256)
    assert np.asarray(pooled.data[0].z).shape == (256, 256)
    assert viz.figure_size(pooled) < 70_000  # never 16M cells
    assert float(np.asarray(pooled.data[0].z)[0, 0]) == pytest.approx(float(probs[0, :16, :16].max()))
    topk = viz.attention_pattern(probs, mode="topk", k=4)
    assert viz.figure_size(topk) <= 3 * 4 * n
    assert len(pooled.to_json()) < 1_000_000


def test_token_attribution_orders_tokens_and_excludes():
    rows = [{"analysis": "attribution", "layer": -1, "head": -1, "metric": "relevance", "value": v,
             "token_index": i, "token": t} for i, t, v in [(2, "cat", 0.7), (0, "[CLS]", 5.0), (1, "a", 0.2)]]
    fig = viz.token_attribution(pd.DataFrame(rows), per_line=2, exclude=["[CLS]"])
    assert fig.data[0].text.tolist() == [["[CLS]", "a"], ["cat", ""]]
    z = np.asarray(fig.data[0].z)
    assert np.isnan(z[0, 0]) and z[1, 0] == pytest.approx(0.7) and np.isnan(z[1, 1])
    signed = viz.token_attribution([0.5, -1.0], ["x", "y"])
    assert signed.data[0].zmid == 0
    with pytest.raises(InputError):
        viz.token_attribution([1.0, 2.0], ["only one"])


def test_per_layer_attribution_tables_pick_one_layer():
    from attnscope.circuits.token_attribution import attribution_table

    values = np.arange(12, dtype=float).reshape(3, 4)          # [layer, key]
    table = attribution_table(values, tokens=["a", "b", "c", "d"], method="rollout")
    last = viz.token_attribution(table, per_line=4)
    np.testing.assert_allclose(np.asarray(last.data[0].z)[0], values[-1])
    np.testing.assert_allclose(np.asarray(viz.token_attribution(table, layer=1, per_line=4).data[0].z)[0], values[1])
    by_layer = viz.attribution_by_layer(table, exclude=["a"])
    z = np.asarray(by_layer.data[0].z)
    assert z.shape == (3, 4) and np.isnan(z[:, 0]).all() and z[2, 3] == 11
    with pytest.raises(InputError):
        viz.token_attribution(table, layer=7)


def test_pruning_curves_mean_band_and_skips_nothing_given():
    rows = [{"analysis": "pruning", "layer": -1, "head": -1, "metric": "acc", "value": v, "fraction": f,
             "order": "random", "seed": s} for f, vals in ((0.0, (1.0, 1.0)), (0.5, (0.4, 0.8))) for s, v in
            enumerate(vals)]
    rows += [{"analysis": "pruning", "layer": -1, "head": -1, "metric": "acc", "value": 1 - f / 4, "fraction": f,
              "order": "importance", "seed": 0} for f in (0.0, 0.5)]
    rows += [{"analysis": "pruning", "layer": -1, "head": -1, "metric": "acc", "value": 0.6, "fraction": 0.5,
              "order": "random_mean", "seed": -1}]  # as circuits.pruning.pruning_curve writes it: not drawn twice
    fig = viz.pruning_curves(pd.DataFrame(rows), baseline=0.9)
    lines = {t.name: t for t in fig.data if t.showlegend is not False}
    assert sorted(lines) == ["importance", "random"]
    assert list(lines["random"].y) == pytest.approx([1.0, 0.6]) and list(lines["importance"].y) == [1.0, 0.875]
    band = next(t for t in fig.data if t.name == "random range")
    assert max(band.y) == 1.0 and min(band.y) == pytest.approx(0.4)


def test_context_profile_mean_and_top_heads():
    rows = [{"analysis": "sinks", "layer": l, "head": h, "metric": "sink", "value": (l + h) * c / 1000,
             "context_length": c} for l in range(2) for h in range(2) for c in (100, 1000)]
    fig = viz.sink_profile(pd.DataFrame(rows), top=1)
    names = [t.name for t in fig.data]
    assert names == ["L1H1", "mean over heads"]
    mean = fig.data[-1]
    assert list(mean.y) == pytest.approx([0.1, 1.0]) and list(mean.customdata) == pytest.approx([0.0, 0.75])


def test_image_overlay_cross_attention_is_the_key_column_on_the_grid():
    from attnscope.probes.adapters.diffusers_unet import UNetAdapter, tiny_unet

    adapter = UNetAdapter(tiny_unet())
    trace = attnscope.capture(adapter, adapter.sample_inputs())
    site = attnscope.Site("unet.up.1", 1, "cross")
    grid = trace.get(site).meta["grid"]
    m = viz.attention_map(trace, 1, 0, tower="unet.up.1", kind="cross", key=3)
    expected = trace.get(site).probs[0, 0, :, 3].reshape(grid).numpy()
    np.testing.assert_allclose(m.values, expected, rtol=1e-6)
    self_map = viz.attention_map(trace, 1, None, tower="unet.up.1", kind="self")
    np.testing.assert_allclose(self_map.values, trace.get(attnscope.Site("unet.up.1", 1)).probs[0].mean(0)
                               .mean(0).reshape(grid).numpy(), rtol=1e-5)
    image = np.zeros((grid[0] * 4, grid[1] * 4, 3), dtype=np.uint8)
    fig = viz.image_overlay(trace, 1, 0, tower="unet.up.1", kind="cross", key=3, image=image)
    assert [t.type for t in fig.data] == ["image", "heatmap"] and fig.data[1].dx == 4.0


def test_image_overlay_vlm_row_over_image_tokens():
    from attnscope.probes.adapters.hf_vlm import tiny_llava

    model = attnscope.load(tiny_llava())
    trace = attnscope.capture(model, model.sample_inputs())
    image = trace.tokens.positions("image")
    m = viz.attention_map(trace, 1, 2)  # text tower, last token -> image tokens
    expected = trace.get(attnscope.Site("text", 1)).probs[0, 2, -1, image].reshape(4, 4).numpy()
    np.testing.assert_allclose(m.values, expected, rtol=1e-6)
    vision = viz.attention_map(trace, 0, 1, tower="vision")  # [CLS] row over the 4 x 4 patches
    np.testing.assert_allclose(vision.values, trace.get(attnscope.Site("vision", 0)).probs[0, 1, 0, 1:]
                               .reshape(4, 4).numpy(), rtol=1e-6)


@pytest.mark.parametrize("name, prefix", [("vit", 1), ("dinov2_registers", 5)])
def test_image_map_of_a_vision_encoder_reads_the_patches_after_its_prefix_tokens(name, prefix):
    """[CLS] (and register tokens) come before the patches: the map is the [CLS] row over the last 16 keys, as the
    model's own eager attention gives it."""
    import torch

    from attnscope.probes.coverage import ARCHITECTURES

    model = ARCHITECTURES[name].builder()
    size = model.config.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    trace = attnscope.capture(attnscope.load(model), {"pixel_values": pixels})
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            eager = model(pixel_values=pixels, output_attentions=True).attentions[1][0, 2]
    finally:
        model.set_attn_implementation("sdpa")
    assert eager.shape[-1] == prefix + 16
    m = viz.attention_map(trace, 1, 2, tower="vision")
    np.testing.assert_allclose(m.values, eager[0, prefix:].reshape(4, 4).numpy(), atol=1e-6)


def test_show_dispatches_on_columns_and_content():
    trace, _ = _trace()
    assert viz.show_trace(trace).layout.yaxis.title.text == "query"
    heads = viz.show_trace(trace, view="heads", metric="sink")
    np.testing.assert_allclose(np.asarray(heads.data[0].z)[0], trace.get(attnscope.Site("text", 0)).probs[..., 0]
                               .mean(dim=(0, 2)).numpy(), rtol=1e-6)
    assert viz.show_table(_table()).data[0].type == "heatmap"
    attr = pd.DataFrame([{"analysis": "x", "layer": -1, "head": -1, "metric": "r", "value": 1.0, "token": "a",
                          "token_index": 0}])
    assert viz.show_table(attnscope.ResultTable(attr)).data[0].texttemplate == "%{text}"
    with pytest.raises(InputError):
        viz.show_table(_table(), view="nope")


def test_latent_self_attention_pattern_ignores_the_prompt_tokens():
    """Diffusion self-attention runs over latent pixels; the trace's strings and padding are the prompt's."""
    import torch

    from attnscope.probes.site import Site
    from attnscope.probes.tokens import TokenInfo
    from attnscope.probes.trace import AttentionTrace, SiteRecord
    from attnscope.viz.pattern import trace_pattern

    probs = torch.softmax(torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(0)), -1)
    record = SiteRecord(site=Site("unet.down.0", 0, "self"), probs=probs, n_query=16, n_key=16)
    tokens = TokenInfo(ids=[[0, 5, 1]], strings=[["<s>", "cat", "</s>"]], padding=[[1, 1, 0]], grid=(4, 4))
    pattern = trace_pattern(AttentionTrace([record], tokens=tokens), 0, 1, tower="unet.down.0")
    assert torch.equal(torch.from_numpy(pattern.matrix), probs[0, 1])  # not cut to the prompt's 2 real tokens
    assert pattern.query_tokens is None and pattern.key_tokens is None


def test_trace_show_long_draws_numpy_block_means_of_the_captured_head():
    """``trace.show("long", layer=, heads=)`` on a real capture: the drawn cells are the block means of that head's
    pattern (numpy), coloured on a log scale."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=64, n_positions=128)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    trace = attnscope.capture(model, torch.randint(0, 64, (1, 96), generator=torch.Generator().manual_seed(1)))
    fig = trace.show("long", layer=1, heads=1, max_cells=24)
    probs = trace.get(attnscope.Site("text", 1)).probs[0, 1].double().numpy()
    want = probs.reshape(24, 4, 24, 4).mean(axis=(1, 3))
    drawn = np.asarray(fig.data[0].z, dtype=np.float64)
    np.testing.assert_allclose(np.where(np.isnan(drawn), 0.0, 10.0 ** drawn), want, rtol=1e-5, atol=1e-12)
    with pytest.raises(attnscope.InputError, match="head not in this record"):
        trace.show("long", layer=1, heads=7)


def test_topk_of_a_small_pattern_names_its_tokens():
    """Top-k on a short input: the axes carry the token strings, each point's hover names its query and key token,
    and the points are the k largest keys per row (numpy); a long input keeps small unlabelled points."""
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(6), size=6).astype(np.float32)
    tokens = ["[CLS]", "the", "cat", "sat", "down", "[SEP]"]
    fig = viz.attention_pattern(probs, mode="topk", k=2, tokens=tokens)
    point = fig.data[0]
    assert list(fig.layout.xaxis.ticktext) == tokens and list(fig.layout.yaxis.ticktext) == tokens
    want = {(q, int(c)) for q in range(6) for c in np.argsort(-probs[q])[:2]}
    assert {(int(y), int(x)) for x, y in zip(point.x, point.y)} == want
    assert all(t == f"{tokens[int(y)]} → {tokens[int(x)]}" for t, x, y in zip(point.text, point.x, point.y))
    assert point.marker.size > 3
    long = viz.attention_pattern(rng.dirichlet(np.ones(100), size=100), mode="topk", k=2, tokens=[str(i) for i in
                                                                                               range(100)])
    assert long.data[0].text is None and long.data[0].marker.size == 3
