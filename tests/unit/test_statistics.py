"""Chunked attention and streaming statistics against a plain float64 transcription of softmax attention."""

import numpy as np
import pytest
import torch

from attnscope.probes.statistics import _chunk_rows, attention_from_qk, select_probs


def naive_probs(q, k, mask_bool, scaling):
    """float64 numpy softmax(q k^T * scaling) with masked keys removed; GQA by repeating kv heads."""
    q, k = q.double().numpy(), k.double().numpy()
    k = np.repeat(k, q.shape[1] // k.shape[1], axis=1)
    logits = np.einsum("bhqd,bhkd->bhqk", q, k) * scaling
    logits = np.where(mask_bool, logits, -np.inf)
    logits -= logits.max(-1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(-1, keepdims=True)


def naive_stats(p, spans, k):
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log(p), 0.0).sum(-1)
    mass = np.stack([p[..., a:b].sum(-1) for a, b in spans], -1)
    order = np.argsort(-p, axis=-1, kind="stable")[..., :k]
    return ent, mass, np.take_along_axis(p, order, -1)


@pytest.fixture(params=["fused", "torch"])
def streaming_path(request, monkeypatch):
    """Run a streaming test through the fused C row kernel, then through the torch-only path."""
    import attnscope.probes.streaming as streaming
    from attnscope.kernels.cpu_rows import native_available

    if request.param == "fused":
        assert native_available(), "the fused CPU kernel did not build: is a C compiler (cc) installed?"
    else:
        monkeypatch.setattr(streaming, "native_available", lambda: False)
    return request.param


@pytest.fixture
def qk():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 7, 8, generator=g) * 2, torch.randn(2, 2, 9, 8, generator=g) * 2


@pytest.mark.parametrize("budget_mb", [64.0, 1e-6])  # 1e-6 forces one query row per chunk
def test_causal_gqa_probs_and_stats_match_naive(qk, budget_mb):
    q, k = qk
    n_q, n_k = q.shape[2], k.shape[2]
    causal = np.arange(n_k)[None, :] <= (np.arange(n_q) + n_k - n_q)[:, None]
    ref = naive_probs(q, k, causal[None, None], 0.3)
    out = attention_from_qk(q, k, None, scaling=0.3, is_causal=True, stats=("entropy", "mass", "topk"),
                            mass_spans=((0, 1), (2, 5)), topk=3, budget_mb=budget_mb)
    np.testing.assert_allclose(out["probs"].numpy(), ref, atol=1e-6)
    ent, mass, topw = naive_stats(ref, [(0, 1), (2, 5)], 3)
    np.testing.assert_allclose(out["entropy"].numpy(), ent, atol=1e-5)
    np.testing.assert_allclose(out["mass"].numpy(), mass, atol=1e-6)
    np.testing.assert_allclose(out["topk_weight"].numpy(), topw, atol=1e-6)
    picked = np.take_along_axis(ref, out["topk_index"].long().numpy(), -1)
    np.testing.assert_allclose(picked, topw, atol=1e-6)


def test_bool_float_and_padding_masks_agree(qk):
    q, k = qk
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[1, 6:] = False
    bool_mask = keep[:, None, None, :].expand(2, 1, 7, 9)
    float_mask = torch.zeros(2, 1, 7, 9).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    ref = naive_probs(q, k, bool_mask.numpy(), 0.25)
    for mask in (bool_mask, float_mask, keep.long()):
        out = attention_from_qk(q, k, mask, scaling=0.25)
        np.testing.assert_allclose(out["probs"].numpy(), ref, atol=1e-6)


def test_rows_and_heads_select_slices(qk):
    q, k = qk
    full = attention_from_qk(q, k, None, scaling=0.3, is_causal=True, stats=("entropy",))
    rows, heads = torch.tensor([5, 6]), torch.tensor([3, 0])
    part = attention_from_qk(q, k, None, scaling=0.3, is_causal=True, rows=rows, heads=heads, stats=("entropy",))
    torch.testing.assert_close(part["probs"], full["probs"][:, heads][:, :, rows])
    torch.testing.assert_close(part["entropy"], full["entropy"][:, heads][:, :, rows])


def test_stats_only_keeps_no_pattern(qk):
    q, k = qk
    out = attention_from_qk(q, k, None, scaling=0.3, want_probs=False, stats=("mass",))
    assert set(out) == {"mass"} and out["mass"].shape == (2, 4, 7, 1)


def test_select_probs_matches_qk_path(qk):
    q, k = qk
    full = attention_from_qk(q, k, None, scaling=0.3, is_causal=True, stats=("entropy", "mass", "topk"))
    again = select_probs(full["probs"], stats=("entropy", "mass", "topk"))
    for name in ("entropy", "mass", "topk_weight"):
        torch.testing.assert_close(again[name], full[name], atol=1e-6, rtol=0)


def test_all_mass_on_first_token_gives_mass_one_and_zero_entropy():
    probs = torch.zeros(1, 1, 4, 4)
    probs[..., 0] = 1.0
    out = select_probs(probs, stats=("mass", "entropy", "topk"), topk=1)
    assert torch.equal(out["mass"][..., 0], torch.ones(1, 1, 4))
    assert torch.equal(out["entropy"], torch.zeros(1, 1, 4))
    assert torch.equal(out["topk_index"][..., 0], torch.zeros(1, 1, 4, dtype=torch.int32))


def test_chunk_size_respects_budget():
    rows = _chunk_rows(batch=1, heads=8, n_query=4096, n_key=4096, budget_mb=16)
    assert rows * 8 * 4096 * 4 * 3 <= 16 * 2**20 and rows >= 1
    assert _chunk_rows(1, 1, 10, 10, 1e9) == 10


@pytest.mark.parametrize("budget_mb", [1e-5, 7e-4, 64.0])  # top-k chunks of 1 row, 3 rows, all rows
@pytest.mark.parametrize("case", ["causal", "square", "decode", "padding", "full"])
@pytest.mark.parametrize("grouped", [True, False])  # 2 key heads for 4 query heads, or keys already repeated
def test_streaming_path_matches_naive(qk, case, budget_mb, grouped, streaming_path):
    from attnscope.probes.streaming import streaming_statistics

    q, k = qk
    k = k if grouped else k.repeat_interleave(2, dim=1)
    mask, causal = None, case in ("causal", "square", "decode")
    if case == "square":  # query and key lengths equal: the kernel's causal flag, no mask built
        k = k[:, :, :q.shape[2]]
    n_q, n_k = q.shape[2], k.shape[2]
    keep = np.ones((2, 1, n_q, n_k), dtype=bool)
    if case == "decode":
        q = q[:, :, -2:]
        n_q = 2
        keep = keep[:, :, :2]
    if causal:
        keep &= (np.arange(n_k)[None, :] <= (np.arange(n_q) + n_k - n_q)[:, None])[None, None]
    if case == "padding":
        keep[1, :, :, 6:] = False
        mask = torch.from_numpy(keep)
    ref = naive_probs(q, k, keep, 0.3)
    fast = streaming_statistics(q, k, mask, scaling=0.3, is_causal=causal, stats=("entropy", "mass", "topk"),
                                mass_spans=((0, 1), (2, 5), (7, 20)), topk=3, budget_mb=budget_mb)
    ent, mass, topw = naive_stats(ref, [(0, 1), (2, 5), (7, 20)], 3)
    np.testing.assert_allclose(fast["entropy"].numpy(), ent, atol=2e-5)
    np.testing.assert_allclose(fast["mass"].numpy(), mass, atol=2e-6)
    np.testing.assert_allclose(fast["topk_weight"].numpy(), topw, atol=2e-6)
    np.testing.assert_allclose(np.take_along_axis(ref, fast["topk_index"].long().numpy(), -1), topw, atol=2e-6)


@pytest.mark.parametrize("budget_mb", [0.05, 64.0])  # several head groups and row chunks, or one chunk
@pytest.mark.parametrize("case", ["causal", "per-head-mask"])
def test_streaming_block_topk_on_long_rows_matches_naive(case, budget_mb, streaming_path):
    """Rows of 700 keys: top-k goes through the block search (11 blocks of 64, the last one padded)."""
    from attnscope.probes.streaming import streaming_statistics

    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 3, 40, 16, generator=g) * 1.5, torch.randn(2, 3, 700, 16, generator=g)
    keep = np.ones((2, 3, 40, 700), dtype=bool)
    mask, causal = None, case == "causal"
    if causal:  # the 40 queries are the last 40 positions
        keep &= (np.arange(700)[None, :] <= (np.arange(40) + 660)[:, None])[None, None]
    else:  # each head sees its own random subset of keys
        keep &= np.random.default_rng(0).random((2, 3, 40, 700)) < 0.3
        mask = torch.from_numpy(keep)
    ref = naive_probs(q, k, keep, 0.25)
    fast = streaming_statistics(q, k, mask, scaling=0.25, is_causal=causal, stats=("entropy", "mass", "topk"),
                                mass_spans=((0, 1), (100, 400)), topk=4, budget_mb=budget_mb)
    ent, mass, topw = naive_stats(ref, [(0, 1), (100, 400)], 4)
    np.testing.assert_allclose(fast["entropy"].numpy(), ent, atol=2e-5)
    np.testing.assert_allclose(fast["mass"].numpy(), mass, atol=2e-6)
    np.testing.assert_allclose(fast["topk_weight"].numpy(), topw, atol=2e-6)
    np.testing.assert_array_equal(fast["topk_index"].long().numpy(), np.argsort(-ref, -1, kind="stable")[..., :4])


def test_streaming_rows_without_visible_keys_attend_uniformly(streaming_path):
    """More queries than keys, causal from the bottom right: the first 3 queries see no key at all. Eager attention
    (a finite minimum as mask) makes such rows uniform: entropy log(n_key), mass = span length / n_key."""
    from attnscope.probes.streaming import streaming_statistics

    q, k = torch.randn(1, 2, 8, 4, generator=torch.Generator().manual_seed(5)), torch.randn(1, 2, 5, 4)
    out = streaming_statistics(q, k, None, scaling=0.5, is_causal=True, stats=("entropy", "mass", "topk"),
                               mass_spans=((0, 2),), topk=2)
    np.testing.assert_allclose(out["entropy"][..., :3].numpy(), np.log(5.0), atol=1e-6)
    np.testing.assert_allclose(out["mass"][..., :3, 0].numpy(), 0.4, atol=1e-6)
    np.testing.assert_allclose(out["topk_weight"][..., :3, :].numpy(), 0.2, atol=1e-6)
    np.testing.assert_allclose(out["entropy"][..., 3].numpy(), 0.0, atol=1e-6)  # sees key 0 only


def test_streaming_path_declines_biased_masks(qk):
    from attnscope.probes.streaming import streaming_statistics

    q, k = qk
    bias = torch.randn(1, 1, 7, 9)  # ALiBi-like additive bias: not a 0/-inf mask
    assert streaming_statistics(q, k.repeat_interleave(2, 1), bias, scaling=0.3, is_causal=False,
                                stats=("entropy",)) is None
