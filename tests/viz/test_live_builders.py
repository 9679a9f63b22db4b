"""The live page's figure builders against analytic cases and independent references: model view thumbnails
(identity attention gives diagonals, pooled thumbnails equal a numpy max-pool), head view lines (top-k / threshold
selection, hover highlight), long-sequence block aggregates (equal a numpy reshape reference for any chunking and
zoom; a planted link is found), and the queries/keys route (probability rows equal a capture's pattern)."""

import numpy as np
import pytest
import torch

from attnscope.errors import InputError
from attnscope.viz.head_lines import head_view, hovered_token, line_segments
from attnscope.viz.long_sequence import BlockAccumulator, block_pattern, long_sequence_view
from attnscope.viz.head_thumbnails import clicked_thumbnail, model_view, mosaic
from tiny_models import tiny_text_model


def _random_attention(*shape, causal=False, seed=0):
    logits = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3
    if causal:
        n = shape[-1]
        logits = logits.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(logits, -1).numpy()


def _block_reference(matrix, block, how):
    """Block mean (over every cell inside the matrix) or max, by numpy padding and reshape."""
    n_q, n_k = matrix.shape
    gq, gk = -(-n_q // block), -(-n_k // block)
    padded = np.full((gq * block, gk * block), np.nan)
    padded[:n_q, :n_k] = matrix
    blocks = padded.reshape(gq, block, gk, block)
    return np.nanmean(blocks, axis=(1, 3)) if how == "mean" else np.nanmax(blocks, axis=(1, 3))


# ---- model view -------------------------------------------------------------------------------------------------

def test_model_view_identity_attention_gives_diagonal_thumbnails():
    attn = np.broadcast_to(np.eye(5, dtype=np.float32), (3, 4, 5, 5))
    z = model_view(attn).data[0].z
    assert z.shape == (3 * 6 - 1, 4 * 6 - 1)
    for layer in range(3):
        for head in range(4):
            thumb = z[layer * 6:layer * 6 + 5, head * 6:head * 6 + 5]
            np.testing.assert_array_equal(thumb, np.eye(5))
    assert np.isnan(z[5]).all() and np.isnan(z[:, 5]).all()  # gaps between thumbnails


def test_model_view_pools_long_patterns_like_a_numpy_max_pool():
    attn = _random_attention(2, 3, 50, 50, causal=True)
    z, side, block = mosaic(attn, thumb=16)
    assert (block, side) == (4, 13)
    thumb = z[14:14 + 13, 2 * 14:2 * 14 + 13]  # layer 1, head 2
    np.testing.assert_allclose(thumb, _block_reference(attn[1, 2], 4, "max"), rtol=1e-6)


def test_model_view_click_anywhere_in_a_thumbnail_gives_its_head():
    fig = model_view(_random_attention(3, 4, 7, 7), selected=(2, 1))
    xs, ys = np.asarray(fig.data[0].x), np.asarray(fig.data[0].y)
    for col in range(len(xs)):
        for row in (0, 7, len(ys) - 1):
            assert clicked_thumbnail({"points": [{"x": xs[col], "y": ys[row]}]}) == (row // 8, col // 8)
    assert clicked_thumbnail({"points": []}) is None
    shape = fig.layout.shapes[0]
    assert shape.x0 == 0.5 and shape.y0 == 1.5  # the outline sits on L2 H1


def test_model_view_rejects_a_wrong_rank():
    with pytest.raises(InputError, match="wrong rank"):
        model_view(np.zeros((4, 4)))


# ---- head view ----------------------------------------------------------------------------------------------------

def test_line_segments_keep_top_k_above_threshold():
    matrix = _random_attention(9, 9, seed=3)
    got = line_segments(matrix, threshold=0.08, top_k=3)
    for q in range(9):
        want = {int(k) for k in np.argsort(-matrix[q])[:3] if matrix[q, k] >= 0.08}
        assert {k for qq, k, _ in got if qq == q} == want
    assert line_segments(np.eye(4), 0.5, 2) == [(i, i, 1.0) for i in range(4)]


def _coloured(fig):
    return {t.name: [(t.y[i], t.y[i + 1]) for i in range(0, len(t.y), 3)] for t in fig.data
            if t.name.startswith("H") and t.y}


def test_head_view_hover_brings_out_one_tokens_lines():
    attn = _random_attention(2, 6, 6, seed=1)
    tokens = list("abcdef")
    plain = _coloured(head_view(attn, tokens=tokens, threshold=0.0, top_k=6))
    assert {q for pairs in plain.values() for q, _ in pairs} == set(range(6))
    query = head_view(attn, tokens=tokens, threshold=0.0, top_k=6, highlight=("query", 2))
    assert all(q == 2 for pairs in _coloured(query).values() for q, _ in pairs)
    assert "'c': what it attends to" in query.layout.title.text
    key = head_view(attn, tokens=tokens, threshold=0.0, top_k=6, highlight=("key", 4))
    assert all(k == 4 for pairs in _coloured(key).values() for _, k in pairs)
    faint = [t for t in key.data if t.name == "other lines"][0]
    assert 4 not in set(faint.y[1::3])  # the grey lines are the others


def test_head_view_token_markers_report_side_and_position():
    fig = head_view(_random_attention(1, 4, 4), tokens=list("wxyz"))
    keys = [t for t in fig.data if t.name == "key tokens"][0]
    assert hovered_token({"points": [{"customdata": keys.customdata[3]}]}) == ("key", 3)
    assert hovered_token({"points": [{"curveNumber": 0}]}) is None


def test_head_view_refuses_long_inputs_and_mismatched_tokens():
    with pytest.raises(InputError, match="too many tokens"):
        head_view(np.full((1, 300, 300), 1 / 300))
    with pytest.raises(InputError, match="differ in length"):
        head_view(np.eye(3)[None], tokens=["a"])


# ---- long-sequence view -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["mean", "max"])
def test_block_pattern_equals_numpy_reference(how):
    matrix = _random_attention(1000, 1000, causal=True, seed=2)
    bp = block_pattern(matrix, how=how, max_cells=128)
    assert bp.block == 8 and bp.values.shape == (125, 125)
    np.testing.assert_allclose(bp.values, _block_reference(matrix, 8, how), rtol=1e-5, atol=1e-9)
    zoom = block_pattern(matrix, how=how, max_cells=64, query_range=(300, 700), key_range=(100, 333))
    assert zoom.block == 7
    np.testing.assert_allclose(zoom.values, _block_reference(matrix[300:700, 100:333], 7, how), rtol=1e-5,
                               atol=1e-9)


def test_block_accumulator_is_independent_of_the_chunking():
    matrix = torch.as_tensor(_random_attention(203, 203, causal=True, seed=4))
    results = []
    for chunks in ([0, 203], [0, 5, 17, 100, 101, 203], list(range(0, 203, 10)) + [203]):
        acc = BlockAccumulator((0, 203), (0, 203), 9, "mean", top_k=0)
        for a, b in zip(chunks[:-1], chunks[1:]):
            acc.add(matrix[a:b, :b].clone(), a)  # causal rows, narrower than the key range
        results.append(acc.result()[0])
    for got in results:
        np.testing.assert_allclose(got, _block_reference(matrix.numpy(), 9, "mean"), rtol=1e-5)


def test_identity_attention_block_means_are_one_over_block():
    bp = block_pattern(np.eye(640, dtype=np.float32), max_cells=64)
    np.testing.assert_allclose(np.diag(bp.values), 0.1, rtol=1e-6)
    assert not (bp.values - np.diag(np.diag(bp.values))).any()  # nothing off the diagonal


def test_a_planted_long_range_link_is_the_strongest():
    n = 2048
    matrix = np.full((n, n), 0.0, dtype=np.float32)
    rows = np.arange(n)
    matrix[rows, rows] = 1.0  # every token attends to itself ...
    matrix[1900] = 0.0
    matrix[1900, 37], matrix[1900, 1900] = 0.9, 0.1  # ... but one retrieves far back
    bp = block_pattern(matrix, max_cells=256, n_links=5)
    assert tuple(bp.links[0, :2]) == (1900, 37) and bp.links[0, 2] == pytest.approx(0.9)
    fig = long_sequence_view(bp)
    assert fig.data[0].type == "heatmap" and any(t.x for t in fig.data[1:])


def test_block_pattern_rejects_ranges_outside_the_pattern():
    with pytest.raises(InputError, match="outside the pattern"):
        block_pattern(np.eye(10), query_range=(5, 20))


# ---- queries and keys ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_probability_rows_equal_the_captured_pattern(family):
    import attnscope
    from attnscope.viz.head_inputs import collect_layer_inputs

    model = tiny_text_model(family)
    ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(0))
    trace = attnscope.capture(model, ids)
    got = collect_layer_inputs(model, ids, [1])[1]
    for head in range(4):
        want = trace.stack()[1, 0, head].numpy()
        rows = got.probability_rows(head, 5, 40, key_stop=40).numpy()
        np.testing.assert_allclose(rows, want[5:40], atol=1e-5)
    np.testing.assert_allclose(block_pattern(got, 3, how="max", max_cells=8).values,
                               _block_reference(trace.stack()[1, 0, 3].numpy(), 5, "max"), atol=1e-5)


def test_queries_and_keys_give_the_logits_of_the_pattern():
    import attnscope
    from attnscope.viz.head_inputs import collect_layer_inputs

    model = tiny_text_model("bert")
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(1))
    sample = collect_layer_inputs(model, ids, [0])[0].sample(2)
    logits = torch.as_tensor(sample.queries @ sample.keys.T)
    want = attnscope.capture(model, ids).stack()[0, 0, 2]
    torch.testing.assert_close(torch.softmax(logits, -1).float(), want, atol=1e-5, rtol=1e-5)


def test_deferred_link_keys_equal_an_eager_search():
    from attnscope.viz.long_blocks import BlockAccumulator

    matrix = torch.as_tensor(_random_attention(300, 300, causal=True, seed=5))
    eager = BlockAccumulator((0, 300), (0, 300), 10, "max", top_k=1, min_distance=10)
    lazy = BlockAccumulator((0, 300), (0, 300), 10, "max", top_k=1, min_distance=10,
                            row_of=lambda q: matrix[q])
    for start in range(0, 300, 64):
        eager.add(matrix[start:start + 64].clone(), start)
        lazy.add(matrix[start:start + 64].clone(), start)
    np.testing.assert_array_equal(eager.result(40)[1], lazy.result(40)[1])
    links = lazy.result(40)[1]
    assert (np.abs(links[:, 0] - links[:, 1]) >= 10).all() and (links[:, 1] != 0).all()  # band and sink skipped
    for q, k, w, lift in links:  # each link is its row's largest weight outside the band and the sink
        row = matrix[int(q)].clone()
        row[0] = -1
        row[max(0, int(q) - 9):int(q) + 10] = -1
        assert int(row.argmax()) == k and w == pytest.approx(float(row.max())) and lift == pytest.approx(w * (q + 1))


def test_traces_show_the_model_and_head_views_inline():
    from attnscope.probes.site import Site
    from attnscope.probes.tokens import TokenInfo
    from attnscope.probes.trace import AttentionTrace, SiteRecord
    from attnscope.viz.notebook import show_trace

    records = [SiteRecord(site=Site("text", layer), probs=torch.eye(3).expand(1, 2, 3, 3).clone(), n_query=3,
                          n_key=3) for layer in range(2)]
    trace = AttentionTrace(records, TokenInfo(strings=[["a", "b", "c"]]))
    z = show_trace(trace, "model_view").data[0].z
    np.testing.assert_array_equal(z[4:7, 4:7], np.eye(3))  # L1 H1: the identity
    lines = show_trace(trace, "head_view", layer=1, heads=[0], threshold=0.5)
    assert [(y, k) for t in lines.data if t.name == "H0" for y, k in zip(t.y[0::3], t.y[1::3])] == \
        [(0, 0), (1, 1), (2, 2)]
