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

    wide = run()
    monkeypatch.setenv("ATTNSCOPE_CACHE", str(tmp_path))
    monkeypatch.setenv("ATTNSCOPE_NATIVE_FLAGS", flags)
    cpu_rows._library.cache_clear()
    try:
        narrow = run()
    finally:
        cpu_rows._library.cache_clear()
    assert len(list(tmp_path.glob("native/*.so"))) == 1  # built again, with the flags
    ref = reference(logits, [333] * 40, [(0, 5)], 6)
    np.testing.assert_array_equal(narrow["topk_index"].numpy(), ref["topk_index"])
    for name in ("entropy", "mass", "topk_weight"):
        torch.testing.assert_close(narrow[name], wide[name], atol=1e-6, rtol=0)


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
