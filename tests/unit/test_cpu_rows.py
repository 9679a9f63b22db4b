"""The fused C row kernel of streaming statistics against float64 numpy, and its build and fallback."""

import numpy as np
import pytest
import torch

from attnscope.kernels import cpu_rows


def reference(logits2, extent, spans, k):
    """float64 statistics of base-2 logit rows, each cut to its extent; top-k by stable sort (earliest first)."""
    out = {"entropy": [], "mass": [], "topk_weight": [], "topk_index": []}
    for row, n in zip(logits2.double().numpy(), extent):
        s = row[:n] * np.log(2.0)
        p = np.exp(s - s.max())
        p /= p.sum()
        out["entropy"].append(-(p[p > 0] * np.log(p[p > 0])).sum())
        out["mass"].append([p[max(a, 0):min(b, n)].sum() for a, b in spans])
        order = np.argsort(-row[:n], kind="stable")[:k]
        out["topk_index"].append(order)
        out["topk_weight"].append(p[order])
    return {name: np.array(value) for name, value in out.items()}


def exact_qk(heads, n_query, n_key, d, seed):
    """Queries and transposed keys in multiples of 1/4: every logit is exact in float32 (and ties are common)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-3, 4, (heads, n_query, d), generator=g).float() / 4
    kt = torch.randint(-3, 4, (heads, d, n_key), generator=g).float() / 4
    return q, kt


def fused(q, kt, *, causal, k, spans=((0, 1), (2, 9))):
    return cpu_rows.qk_row_statistics(q, kt, causal=causal, spans=list(spans), k=k, entropy=True, mass=True)


def masked_reference(q, kt, causal, spans, k):
    """The float64 statistics of the fused path: logits q . k, causal rows cut at their last visible key (at least
    k keys read, the extra ones masked); a row that sees no key is uniform over all keys."""
    heads, n_query, _ = q.shape
    n_key = kt.shape[-1]
    logits = (q.double() @ kt.double()).reshape(heads * n_query, n_key)
    extent = []
    for r in range(heads * n_query):
        seen = min(r % n_query + n_key - n_query + 1, n_key) if causal else n_key
        n = n_key if seen < 1 else max(seen, min(max(k, 1), n_key))
        logits[r, max(seen, 0):n] = -1e30
        extent.append(n)
    return reference(logits, extent, spans, k)


@pytest.fixture(autouse=True)
def kernel_built():
    assert cpu_rows.native_available(), "the fused CPU kernel did not build: is a C compiler (cc) installed?"


@pytest.mark.parametrize("k", [1, 5, 40])  # 40: more lanes, the bar lower than most rows' maxima
@pytest.mark.parametrize("width", [7, 100, 700, 5000])  # shorter than a vector, than the lanes, and long rows
def test_rows_match_float64(width, k):
    g = torch.Generator().manual_seed(width)
    logits = torch.randn(37, width + 13, generator=g) * 4  # 13 columns of stride beyond the width are never read
    logits[:, width:] = 1e6
    logits[5, : width // 2] = -1e30  # masked keys
    spans = [(0, 1), (2, width // 2), (width - 3, width + 40)]
    out = cpu_rows.row_statistics(logits, width=width, extent=None, spans=spans, k=min(k, width), entropy=True,
                                  mass=True)
    ref = reference(logits, [width] * 37, spans, min(k, width))
    np.testing.assert_allclose(out["entropy"].numpy(), ref["entropy"], atol=1e-5)
    np.testing.assert_allclose(out["mass"].numpy(), ref["mass"], atol=1e-6)
    np.testing.assert_allclose(out["topk_weight"].numpy(), ref["topk_weight"], atol=1e-6)
    np.testing.assert_array_equal(out["topk_index"].numpy(), ref["topk_index"])


@pytest.mark.parametrize("flags", ["-mno-avx512f", "-mno-avx2 -mno-avx512f"])  # the AVX2 and the plain C scans
def test_narrower_instruction_sets_give_the_same_statistics(flags, tmp_path, monkeypatch):
    logits = torch.randint(0, 6, (40, 333), generator=torch.Generator().manual_seed(4)).float() * 0.7
    logits[3, :200] = -1e30
    def run():
        return cpu_rows.row_statistics(logits, width=333, extent=None, spans=[(0, 5)], k=6, entropy=True, mass=True)

    def run_qk():
        return fused(*exact_qk(3, 45, 70, 32, seed=9), causal=True, k=6)

    wide, wide_qk = run(), run_qk()
    monkeypatch.setenv("ATTNSCOPE_CACHE", str(tmp_path))
    monkeypatch.setenv("ATTNSCOPE_NATIVE_FLAGS", flags)
    cpu_rows._library.cache_clear()
    try:
        narrow, narrow_qk = run(), run_qk()
    finally:
        cpu_rows._library.cache_clear()
    assert len(list(tmp_path.glob("native/*.so"))) == 1  # built again, with the flags
    ref = reference(logits, [333] * 40, [(0, 5)], 6)
    np.testing.assert_array_equal(narrow["topk_index"].numpy(), ref["topk_index"])
    for name in ("entropy", "mass", "topk_weight"):
        torch.testing.assert_close(narrow[name], wide[name], atol=1e-6, rtol=0)
        torch.testing.assert_close(narrow_qk[name], wide_qk[name], atol=1e-6, rtol=0)
    assert torch.equal(narrow_qk["topk_index"], wide_qk["topk_index"])  # exact logits: the same ranking


def test_ties_rank_the_earliest_key_first():
    """Integer logits tie everywhere: the top-k order must be (value descending, key ascending), as a stable sort."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 4, (50, 300), generator=g).float()
    out = cpu_rows.row_statistics(logits, width=300, extent=None, spans=[], k=7, entropy=False, mass=False)
    ref = reference(logits, [300] * 50, [], 7)
    np.testing.assert_array_equal(out["topk_index"].numpy(), ref["topk_index"])
    np.testing.assert_allclose(out["topk_weight"].numpy(), ref["topk_weight"], atol=1e-6)
    assert set(out) == {"topk_weight", "topk_index"}


def test_extents_repeat_over_rows_and_fully_masked_rows_are_uniform():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3 * 4, 64, generator=g)
    logits[1::4, 20:] = 1e9  # beyond row 1's extent of 20 keys: must never be read
    logits[3::4] = -1e30  # every key masked: uniform attention over the 64, as eager attention gives
    extent = torch.tensor([64, 20, 5, 64])  # one head's rows, repeated for the 3 heads
    out = cpu_rows.row_statistics(logits, width=64, extent=extent, spans=[(0, 4)], k=3, entropy=True, mass=True)
    ref = reference(logits, extent.tolist() * 3, [(0, 4)], 3)
    np.testing.assert_allclose(out["entropy"].numpy(), ref["entropy"], atol=1e-5)
    np.testing.assert_allclose(out["mass"].numpy(), ref["mass"], atol=1e-6)
    np.testing.assert_allclose(out["entropy"][3::4].numpy(), np.log(64.0), atol=1e-6)


def test_threads_split_rows_without_changing_a_bit():
    logits = torch.randn(1000, 257, generator=torch.Generator().manual_seed(2))
    def run():
        return cpu_rows.row_statistics(logits, width=257, extent=None, spans=[(0, 3)], k=4, entropy=True, mass=True)

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(before)
    for name in one:
        assert torch.equal(one[name], two[name]), name


def test_build_caches_per_source_and_a_missing_compiler_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNSCOPE_CACHE", str(tmp_path))
    cpu_rows._library.cache_clear()
    try:
        assert cpu_rows.native_available()
        built = list((tmp_path / "native").glob("cpu_row_statistics-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        cpu_rows._library.cache_clear()
        assert cpu_rows.native_available() and built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt

        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
        monkeypatch.setenv("ATTNSCOPE_CACHE", str(tmp_path / "elsewhere"))
        cpu_rows._library.cache_clear()
        with pytest.warns(UserWarning, match="torch path"):
            assert not cpu_rows.native_available()
        assert cpu_rows.row_statistics(torch.zeros(1, 4), width=4, extent=None, spans=[], k=1, entropy=True,
                                       mass=False) is None
    finally:
        cpu_rows._library.cache_clear()


def test_wrong_layout_and_too_large_k_are_refused():
    with pytest.raises(ValueError, match="contiguous float32"):
        cpu_rows.row_statistics(torch.zeros(4, 3).t(), width=4, extent=None, spans=[], k=1, entropy=True,
                                mass=False)
    with pytest.raises(ValueError, match="up to k = 256"):
        cpu_rows.row_statistics(torch.zeros(2, 300), width=300, extent=None, spans=[], k=257, entropy=False,
                                mass=False)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n_query,n_key,d", [(1, 1, 3), (9, 9, 8), (37, 200, 32), (8, 3, 16), (70, 1031, 64)])
@pytest.mark.parametrize("k", [0, 1, 5])
def test_fused_qk_path_matches_float64(causal, n_query, n_key, d, k):
    """Logits computed inside the kernel, 8 rows at a time: causal extents from the bottom right, rows with fewer
    than k visible keys, rows with none (more queries than keys), key counts that are not multiples of 16."""
    q, kt = exact_qk(2, n_query, n_key, d, seed=n_query + n_key)
    spans = [(0, 1), (2, 9)]
    out = fused(q, kt, causal=causal, k=min(k, n_key), spans=spans)
    ref = masked_reference(q, kt, causal, spans, min(k, n_key))
    np.testing.assert_allclose(out["entropy"].numpy(), ref["entropy"], atol=1e-5)
    np.testing.assert_allclose(out["mass"].numpy(), ref["mass"], atol=1e-6)
    if k:
        np.testing.assert_array_equal(out["topk_index"].numpy(), ref["topk_index"])
        np.testing.assert_allclose(out["topk_weight"].numpy(), ref["topk_weight"], atol=1e-6)
    else:
        assert "topk_index" not in out


def test_fused_qk_path_on_real_valued_logits():
    g = torch.Generator().manual_seed(3)
    q, kt = torch.randn(3, 130, 32, generator=g), torch.randn(3, 32, 300, generator=g)
    out = fused(q, kt, causal=True, k=4)
    ref = masked_reference(q, kt, True, [(0, 1), (2, 9)], 4)
    np.testing.assert_allclose(out["entropy"].numpy(), ref["entropy"], atol=1e-5)
    np.testing.assert_allclose(out["mass"].numpy(), ref["mass"], atol=1e-6)
    np.testing.assert_allclose(out["topk_weight"].numpy(), ref["topk_weight"], atol=1e-6)


def test_fused_qk_rows_split_across_threads_without_changing_a_bit():
    """Thread boundaries fall inside blocks of 8 rows: a row's logits must not depend on its block."""
    q, kt = torch.randn(3, 333, 32), torch.randn(3, 32, 400)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused(q, kt, causal=True, k=5)
        torch.set_num_threads(2)
        two = fused(q, kt, causal=True, k=5)
    finally:
        torch.set_num_threads(before)
    for name in one:
        assert torch.equal(one[name], two[name]), name


def test_fused_qk_wrong_layout_is_refused():
    q, kt = torch.zeros(2, 4, 8), torch.zeros(2, 8, 5)
    with pytest.raises(ValueError, match="key_t"):
        cpu_rows.qk_row_statistics(q, kt.transpose(1, 2).contiguous().transpose(1, 2), causal=True, spans=[], k=1,
                                   entropy=True, mass=False)
    with pytest.raises(ValueError, match="key_t"):
        cpu_rows.qk_row_statistics(q, torch.zeros(2, 7, 5), causal=True, spans=[], k=1, entropy=True, mass=False)
