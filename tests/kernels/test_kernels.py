"""Attention kernels: the torch reference against a naive float64 transcription, and the Triton kernels against the
reference, in Triton's interpreter on CPU (always) and compiled on CUDA (when present).

Interpreter: ``backend="triton"`` on CPU tensors runs the kernels interpreted without ``TRITON_INTERPRET`` being set
before triton's import (diffusers imports triton while pytest collects; see ``attnscope.kernels.launch``). One test
also runs the classic way, in a subprocess started with ``TRITON_INTERPRET=1``.

Tolerances (kernel vs reference, both from the same rounded inputs, float32 accumulation):
- float32: 1e-5 absolute and relative on every output (interpreter: exact fp32 dots; CUDA: tf32x3 dots).
- float16 / bfloat16 statistics and lse: 1e-4 (only the summation order differs).
- float16 output: 2e-3; bfloat16 output: 2e-2 elementwise (probabilities are rounded to the input dtype before
  P @ V, as in FlashAttention, and the output is rounded once more: one output ulp apart is normal), and
  ||out - ref|| / ||ref|| <= 1e-6 (float32), 1e-3 (float16), 1e-2 (bfloat16); measured in the interpreter:
  2e-7, 2e-4, 4.5e-3.
Top-k: indices equal in the interpreter (float32); on CUDA the reference probability at each returned index must
equal the returned weight (near-ties may swap).
"""

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from attnscope.errors import InputError
from attnscope.kernels import (attention_reference, attention_with_interventions, head_interventions,
                               row_probabilities, streaming_statistics_cuda)
from attnscope.kernels import launch
from attnscope.probes.statistics import attention_from_qk

STATS = ("entropy", "mass", "topk")
CUDA = torch.cuda.is_available()


# ---- an independent float64 oracle ----------------------------------------------------------------------------------

def naive(q, k, v, *, scale, causal=False, keep=None, bias=None, gate=None, uniform=None, spans=(), topk=0):
    """Row by row in float64 numpy. keep(b, h, i, j) -> bool, bias(b, h, i, j) -> float; gate/uniform [B, H]."""
    q, k, v = (t.double().numpy() for t in (q, k, v))
    b_, h_, m, _ = q.shape
    n = k.shape[2]
    group = h_ // k.shape[1]
    res = {name: [] for name in ("out", "lse", "probs", "entropy", "mass", "topw", "topi")}
    for b in range(b_):
        for h in range(h_):
            uni = bool(uniform[b][h]) if uniform is not None else False
            g = float(gate[b][h]) if gate is not None else 1.0
            for i in range(m):
                ok = np.array([(not causal or j <= i + n - m) and (keep is None or keep(b, h, i, j))
                               for j in range(n)])
                logits = np.array([0.0 if uni else scale * float(q[b, h, i] @ k[b, h // group, j]) for j in range(n)])
                if bias is not None and not uni:
                    logits += np.array([bias(b, h, i, j) for j in range(n)])
                if not ok.any():  # no allowed key: uniform over every key
                    ok, logits = np.ones(n, bool), np.zeros(n)
                logits = np.where(ok, logits, -np.inf)
                top = logits.max()
                lse = top + math.log(np.exp(logits - top).sum())
                p = np.exp(logits - lse)
                res["out"].append(g * (p @ v[b, h // group]))
                res["lse"].append(lse)
                res["probs"].append(p)
                res["entropy"].append(-sum(x * math.log(x) for x in p if x > 0))
                res["mass"].append([p[max(a, 0):min(e, n)].sum() for a, e in spans])
                order = sorted(range(n), key=lambda j: (-logits[j], j))[:min(topk, n)]
                res["topw"].append([p[j] for j in order])
                res["topi"].append([j if ok[j] else -1 for j in order])
    shape = (b_, h_, m)
    return {name: torch.tensor(np.array(val, dtype=np.int64 if name == "topi" else np.float64)).reshape(*shape, -1)
            if name not in ("lse", "entropy") else torch.tensor(np.array(val)).reshape(shape)
            for name, val in res.items()}


def _inputs(seed, b, h, hkv, m, n, d, dtype=torch.float32, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, x, s, d, generator=g) for x, s in ((h, m), (hkv, n), (hkv, n)))
    return (q * scale).to(dtype), (k * scale).to(dtype), v.to(dtype)


def _close(got, want, tol, name=""):
    torch.testing.assert_close(got.double(), want.double(), atol=tol, rtol=tol, msg=lambda s: f"{name}: {s}")


def _check_against_naive(res, ref, spans=True, topk=True):
    _close(res["out"], ref["out"], 1e-5, "out")
    _close(res["lse"], ref["lse"], 1e-5, "lse")
    _close(res["entropy"], ref["entropy"], 1e-5, "entropy")
    if spans:
        _close(res["mass"], ref["mass"], 1e-6, "mass")
    if topk:
        _close(res["topk_weight"], ref["topw"], 1e-6, "topk_weight")
        assert torch.equal(res["topk_index"].long(), ref["topi"])


# ---- reference vs naive float64 --------------------------------------------------------------------------------------

REF_CASES = {
    # name: (b, h, hkv, m, n, causal, keep, bias)
    "causal_gqa": (2, 4, 2, 7, 7, True, None, None),
    "decode": (2, 4, 1, 2, 9, True, None, None),
    "full_gqa": (1, 4, 2, 5, 8, False, None, None),
    "left_padding_causal": (2, 2, 2, 6, 6, True, "pad", None),
    "sliding_window_bias": (1, 2, 1, 6, 6, True, "window", "alibi"),
    "more_queries_than_keys": (1, 2, 2, 6, 4, True, None, None),
}


def _keep_and_mask(kind, b, h, m, n):
    if kind is None:
        return None, None
    if kind == "pad":  # item 1 left-padded by 3: its first 3 queries have no allowed key under causality
        keep = torch.ones(b, n, dtype=torch.long)
        keep[1, :3] = 0
        return (lambda bb, hh, i, j: bool(keep[bb, j])), keep
    window = torch.tensor([[abs(i + n - m - j) < 3 for j in range(n)] for i in range(m)])
    return (lambda bb, hh, i, j: bool(window[i, j])), window[None, None]


@pytest.mark.parametrize("case", list(REF_CASES))
def test_reference_matches_naive_float64(case):
    b, h, hkv, m, n, causal, keep_kind, bias_kind = REF_CASES[case]
    q, k, v = _inputs(len(case), b, h, hkv, m, n, 8)
    keep_fn, mask = _keep_and_mask(keep_kind, b, h, m, n)
    bias_fn = None
    if bias_kind:
        slopes = torch.tensor([0.5, 0.25])
        alibi = -slopes[:, None, None] * (torch.arange(m)[:, None] + n - m - torch.arange(n)[None, :]).abs()
        bias_fn = lambda bb, hh, i, j: float(alibi[hh, i, j])  # noqa: E731
        mask = torch.zeros(1, h, m, n).masked_fill(~mask, torch.finfo(torch.float32).min) + alibi[None]
    spans = [(0, 1), (2, 5), (4, 40)]
    ref = naive(q, k, v, scale=0.3, causal=causal, keep=keep_fn, bias=bias_fn, spans=spans, topk=3)
    res = attention_reference(q, k, v, mask, scaling=0.3, is_causal=causal, stats=STATS, mass_spans=spans, topk=3,
                              prob_rows=torch.tensor([0, m - 1]), budget_mb=1e-6)  # one row per chunk
    _check_against_naive(res, ref)
    _close(res["probs"], ref["probs"][:, :, [0, m - 1]], 1e-6, "probs")


@pytest.mark.parametrize("mode", ["uniform", "zero", "rescale"])
def test_reference_interventions_match_naive_and_analytic(mode):
    b, h, hkv, m, n = 2, 4, 2, 5, 7
    q, k, v = _inputs(11, b, h, hkv, m, n, 8)
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[0, 5:] = False
    gate, uni = head_interventions(h, zero=[1] if mode == "zero" else [],
                                   rescale={2: -0.5} if mode == "rescale" else None,
                                   uniform=[0, 3] if mode == "uniform" else [])
    ref = naive(q, k, v, scale=0.4, causal=True, keep=lambda bb, hh, i, j: bool(keep[bb, j]),
                gate=gate[None].expand(b, h), uniform=uni[None].expand(b, h), spans=[(0, 2)], topk=2)
    res = attention_reference(q, k, v, keep, scaling=0.4, is_causal=True, gate=gate, uniform=uni, stats=STATS,
                              mass_spans=[(0, 2)], topk=2)
    _check_against_naive(res, ref)
    base = attention_reference(q, k, v, keep, scaling=0.4, is_causal=True)["out"]
    if mode == "uniform":  # mean of the allowed values; entropy log(#allowed)
        allowed = (torch.arange(n)[None, None, :] <= torch.arange(m)[None, :, None] + n - m) & keep[:, None, :]
        mean_v = (allowed.double() @ v.double().repeat_interleave(2, 1)[:, 0]) / allowed.sum(-1, keepdim=True)
        _close(res["out"][:, 0], mean_v, 1e-6, "uniform out")
        _close(res["entropy"][:, 3], allowed.sum(-1).double().log(), 1e-6, "uniform entropy")
    elif mode == "zero":
        assert torch.equal(res["out"][:, 1], torch.zeros_like(res["out"][:, 1]))
        _close(res["out"][:, [0, 2, 3]], base[:, [0, 2, 3]], 0, "other heads")
    else:
        _close(res["out"][:, 2], -0.5 * base[:, 2], 1e-7, "rescaled head")


def test_per_batch_gates_run_an_ablation_sweep():
    q, k, v = _inputs(5, 1, 4, 2, 5, 5, 8)
    gates = 1.0 - torch.eye(4)  # batch item i ablates head i
    res = attention_reference(q.expand(4, -1, -1, -1), k.expand(4, -1, -1, -1), v.expand(4, -1, -1, -1),
                              is_causal=True, gate=gates)
    base = attention_reference(q, k, v, is_causal=True)["out"][0]
    for i in range(4):
        assert torch.equal(res["out"][i, i], torch.zeros_like(base[i]))
        _close(res["out"][i, [j for j in range(4) if j != i]], base[[j for j in range(4) if j != i]], 0, "sweep")


def test_bad_inputs_raise_clear_errors():
    q, k, v = _inputs(1, 1, 3, 2, 4, 4, 8)
    with pytest.raises(InputError, match="multiple of KV heads"):
        attention_reference(q, k, v)
    q, k, v = _inputs(1, 1, 4, 2, 4, 4, 8)
    with pytest.raises(InputError, match="broadcast"):
        attention_reference(q, k, v, torch.ones(1, 1, 4, 5, dtype=torch.bool))
    with pytest.raises(InputError, match="unknown statistic"):
        attention_reference(q, k, v, stats=("mean",))
    with pytest.raises(InputError, match="gate"):
        attention_reference(q, k, v, gate=torch.ones(3))
    with pytest.raises(InputError, match="rows out of range"):
        attention_with_interventions(q, k, v, prob_rows=torch.tensor([4]), backend="triton")
    q, k, v = _inputs(1, 1, 4, 2, 4, 12, 8)
    with pytest.raises(InputError, match="at most 8"):
        attention_with_interventions(q, k, v, stats=("topk",), topk=9, backend="triton")


# ---- Triton kernels (interpreter on CPU, compiled on CUDA) vs the reference -----------------------------------------

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-4, 2e-3), torch.bfloat16: (1e-4, 2e-2)}  # (stats, out)
OUT_NORM_TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}  # ||out - ref|| / ||ref||


def _compare(got, ref, dtype, exact_index=True):
    stat_tol, out_tol = TOL[dtype]
    assert set(got) == set(ref), (set(got), set(ref))
    for name in ref:
        if name == "topk_index":
            continue
        assert torch.isfinite(got[name]).all(), name
        _close(got[name].cpu(), ref[name].cpu(), out_tol if name == "out" else stat_tol, name)
    if "out" in ref:
        out, want = got["out"].cpu().double(), ref["out"].cpu().double()
        assert (out - want).norm() <= OUT_NORM_TOL[dtype] * want.norm()
    if "topk_index" in ref:
        idx = got["topk_index"].cpu()
        if exact_index:
            assert torch.equal(idx, ref["topk_index"].cpu())
        assert ((idx >= 0) == (ref["topk_index"].cpu() >= 0)).all()


def _poisoned_empty(real_empty):
    def empty(*shape, dtype=None, **kw):
        t = real_empty(*shape, dtype=dtype, **kw)
        return t.fill_(float("nan") if t.is_floating_point() else -7)
    return empty


KERNEL_CASES = {
    # name: (dtype, b, h, hkv, m, n, d, causal, mask kind, interventions, topk)
    "fp32_causal_gqa_all": (torch.float32, 2, 4, 2, 19, 37, 16, True, "pad", True, 4),
    "bf16_causal_gqa_all": (torch.bfloat16, 1, 4, 2, 19, 37, 16, True, "pad", True, 4),
    "fp16_padding_decode": (torch.float16, 2, 2, 1, 3, 21, 32, True, "pad", False, 3),
    "fp32_window_bias_d24": (torch.float32, 1, 2, 1, 17, 17, 24, True, "window_bias", True, 8),
    "fp32_more_queries_than_keys": (torch.float32, 1, 2, 2, 20, 5, 16, True, None, True, 8),
    # no keep mask and several key tiles: the unmasked FlashAttention loop runs before the masked one
    "fp32_causal_unmasked_tiles": (torch.float32, 1, 2, 1, 33, 50, 16, True, None, True, 5),
    "bf16_full_unmasked_tiles": (torch.bfloat16, 1, 2, 1, 17, 40, 16, False, None, False, 3),
    # dead rows in the first query block, whose causal range ends long before the last key they must see
    "fp32_dead_rows_see_every_key": (torch.float32, 1, 2, 1, 40, 40, 16, True, "pad", False, 3),
}


def _kernel_inputs(case):
    dtype, b, h, hkv, m, n, d, causal, mask_kind, interv, topk = KERNEL_CASES[case]
    q, k, v = _inputs(sum(map(ord, case)), b, h, hkv, m, n, d, dtype)
    mask = None
    if mask_kind == "pad":
        mask = torch.ones(b, n, dtype=torch.long)
        mask[-1, : n - m + 2] = 0  # left padding: the first two queries see no key (dead rows: uniform)
    elif mask_kind == "window_bias":
        window = (torch.arange(m)[:, None] + n - m - torch.arange(n)[None, :]).abs() < 6
        mask = torch.zeros(1, h, m, n).masked_fill(~window, -math.inf) - 0.1 * torch.arange(h)[None, :, None, None]
    gate = uni = None
    if interv:
        gate, uni = head_interventions(h, zero=[h - 1], rescale={0: 0.5}, uniform=[1])
    kw = dict(scaling=d ** -0.5, is_causal=causal, gate=gate, uniform=uni, stats=STATS, topk=topk,
              mass_spans=[(0, 1), (2, 9), (n - 3, n + 10)], prob_rows=torch.tensor([0, m // 2, m - 1]))
    return (q, k, v, mask), kw


@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_triton_interpreter_matches_reference(case, monkeypatch):
    args, kw = _kernel_inputs(case)
    ref = attention_with_interventions(*args, backend="torch", **kw)
    monkeypatch.setattr(launch.torch, "empty", _poisoned_empty(torch.empty))  # every output element must be written
    got = attention_with_interventions(*args, backend="triton", **kw)
    monkeypatch.undo()
    _compare(got, ref, args[0].dtype, exact_index=args[0].dtype == torch.float32)


def test_triton_topk_ties_and_short_rows():
    """Uniform heads tie every key: the lowest indices win; rows with fewer keys than k pad with (0, -1)."""
    q, k, v = _inputs(3, 1, 2, 1, 6, 10, 16)
    kw = dict(is_causal=True, uniform=torch.tensor([True, False]), stats=("topk",), topk=8)
    got = attention_with_interventions(q, k, v, backend="triton", **kw)
    ref = attention_with_interventions(q, k, v, backend="torch", **kw)
    _compare(got, ref, torch.float32)
    row0 = got["topk_index"][0, 0, 0]  # query 0 sees keys 0..4, uniformly
    assert row0.tolist() == [0, 1, 2, 3, 4, -1, -1, -1]
    _close(got["topk_weight"][0, 0, 0], torch.tensor([0.2] * 5 + [0.0] * 3), 1e-6)
    # ties across key tiles: logits 1, 1 on keys 0, 1 (first tile), 2 on key 20 (second tile); k = 2 keeps key 0
    q, k = torch.zeros(1, 1, 1, 16), torch.full((1, 1, 24, 16), 0.0)
    q[..., 0] = 1.0
    k[0, 0, :, 0] = -1.0
    k[0, 0, [0, 1], 0], k[0, 0, 20, 0] = 1.0, 2.0
    got = attention_with_interventions(q, k, k, scaling=1.0, stats=("topk",), topk=2, backend="triton")
    assert got["topk_index"][0, 0, 0].tolist() == [20, 0]


def test_streaming_statistics_cuda_entry_point_matches_chunked_path():
    """The function capture calls on CUDA, here forced to Triton on CPU: same statistics as the chunked path."""
    q, k, _ = _inputs(8, 2, 4, 2, 9, 12, 16)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0
    heads = torch.tensor([3, 0, 1])
    kw = dict(scaling=0.25, is_causal=True, stats=STATS, mass_spans=((0, 1), (3, 7)), topk=3)
    got = streaming_statistics_cuda(q, k, mask, heads=heads, backend="triton", **kw)
    want = attention_from_qk(q, k, mask, heads=heads, want_probs=False, budget_mb=1e-4, **kw)
    assert set(got) == set(want)
    for name in ("entropy", "mass", "topk_weight"):
        _close(got[name], want[name], 1e-5, name)
    probs = attention_from_qk(q, k, mask, heads=heads, **kw)["probs"]  # ties (dead rows) may pick other keys
    idx = got["topk_index"].long()
    _close(torch.where(idx >= 0, probs.gather(-1, idx.clamp_min(0)), 0.0), got["topk_weight"], 1e-6, "weights")
    assert streaming_statistics_cuda(q, k, mask, backend="triton", **{**kw, "topk": 9}) is None


def test_force_triton_env_selects_the_kernels(monkeypatch):
    calls = []
    real = launch.forward
    monkeypatch.setattr(launch, "forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = _inputs(2, 1, 2, 1, 4, 4, 16)
    attention_with_interventions(q, k, v)
    assert not calls  # CPU tensors, no override: the torch reference
    monkeypatch.setenv("ATTNSCOPE_FORCE_TRITON", "1")
    got = attention_with_interventions(q, k, v, is_causal=True)
    assert calls
    _close(got["out"], attention_reference(q, k, v, is_causal=True)["out"], 1e-5)


def test_row_probabilities_second_pass():
    q, k, v = _inputs(4, 1, 2, 2, 9, 9, 16)
    fwd = attention_with_interventions(q, k, v, is_causal=True, backend="torch")
    rows = torch.tensor([8, 0, 4])
    got = row_probabilities(q, k, fwd["lse"], rows, is_causal=True, backend="triton")
    want = attention_from_qk(q, k, None, scaling=16 ** -0.5, is_causal=True, rows=rows)["probs"]
    _close(got, want, 1e-6, "probs")


def test_interpreted_launch_leaves_triton_language_as_it_was():
    """The interpreter patches triton.language (device-function calls never undo it): compiles after it must work."""
    import triton.language as tl

    before = {name: getattr(obj, name, None) for obj, names in ((tl, ("sum", "max", "zeros", "num_programs", "dot")),
                                                          (tl.tensor, ("__bool__", "__add__", "to")))
              for name in names}
    q, k, v = _inputs(7, 1, 2, 1, 5, 5, 16)
    attention_with_interventions(q, k, v, stats=STATS, topk=2, prob_rows=torch.tensor([1]), backend="triton")
    after = {name: getattr(obj, name, None) for obj, names in ((tl, ("sum", "max", "zeros", "num_programs", "dot")),
                                                         (tl.tensor, ("__bool__", "__add__", "to")))
             for name in names}
    assert after == before


def test_classic_triton_interpret_env_in_a_subprocess():
    """TRITON_INTERPRET=1 set before triton is imported (how Triton's own CI interprets): same results."""
    script = textwrap.dedent("""
        import torch
        from attnscope.kernels import attention_with_interventions
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, 2, 5, 16, generator=g)
        k, v = torch.randn(1, 1, 7, 16, generator=g), torch.randn(1, 1, 7, 16, generator=g)
        kw = dict(is_causal=True, stats=("entropy", "mass", "topk"), topk=2, uniform=[False, True])
        a = attention_with_interventions(q, k, v, backend="triton", **kw)
        b = attention_with_interventions(q, k, v, backend="torch", **kw)
        assert all(torch.allclose(a[n].float(), b[n].float(), atol=1e-5) for n in b), "mismatch"
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


# ---- compiled kernels on a CUDA device -------------------------------------------------------------------------------

@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", ["causal_padding", "decode", "full_window"])
def test_cuda_kernels_match_reference(dtype, case):
    b, h, hkv, d = 2, 8, 2, 128 if dtype != torch.float32 else 64
    m, n = {"causal_padding": (300, 300), "decode": (1, 777), "full_window": (129, 257)}[case]
    q, k, v = (t.cuda() for t in _inputs(sum(map(ord, case)), b, h, hkv, m, n, d, dtype))
    mask = torch.ones(b, n, dtype=torch.long, device="cuda")
    mask[1, :50] = 0
    if case == "full_window":
        mask = ((torch.arange(m)[:, None] + n - m - torch.arange(n)[None, :]).abs() < 40)[None, None].cuda()
    gate, uni = head_interventions(h, zero=[2], rescale={3: 2.0}, uniform=[5])
    kw = dict(is_causal=case != "full_window", gate=gate, uniform=uni, stats=STATS, topk=8,
              mass_spans=[(0, 1), (10, 200)], prob_rows=torch.tensor([0, m - 1]))
    ref = attention_with_interventions(q, k, v, mask, backend="torch", **kw)
    got = attention_with_interventions(q, k, v, mask, backend="triton", **kw)
    _compare(got, ref, dtype, exact_index=False)
    # the weights at the kernel's indices equal the reference probabilities there
    rows = attention_with_interventions(q, k, v, mask, backend="torch", **{**kw, "prob_rows": torch.arange(m)})
    idx = got["topk_index"].long()
    picked = torch.where(idx >= 0, rows["probs"].gather(-1, idx.clamp_min(0)), 0.0)
    _close(picked, got["topk_weight"], TOL[dtype][0], "weights at indices")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_every_autotune_config_is_correct():
    q, k, v = (t.cuda() for t in _inputs(9, 1, 4, 2, 200, 200, 128, torch.bfloat16))
    kw = dict(is_causal=True, stats=STATS, topk=5, mass_spans=[(0, 1), (5, 50)])
    from attnscope.kernels.problem import dead_rows, normalize

    from triton.runtime.errors import OutOfResources

    pb = normalize(q, k, v, None, scaling=128 ** -0.5, **kw)
    ref = attention_with_interventions(q, k, v, backend="torch", **kw)
    ran = 0
    for cfg in launch.hopper_configs():
        try:
            got = launch.forward(pb, dead_rows(pb), config={**cfg.kwargs, "num_warps": cfg.num_warps,
                                                             "num_stages": cfg.num_stages})
        except OutOfResources:  # the autotuner skips these too
            continue
        _compare(got, ref, torch.bfloat16, exact_index=False)
        ran += 1
    assert ran >= len(launch._BIG)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_capture_path_uses_the_kernel_and_matches_cpu():
    q, k, _ = _inputs(6, 2, 8, 2, 64, 64, 64)
    kw = dict(scaling=0.125, is_causal=True, want_probs=False, stats=STATS, mass_spans=((0, 1),), topk=4)
    cpu = attention_from_qk(q, k, None, **kw)
    gpu = attention_from_qk(q.cuda(), k.cuda(), None, **kw)
    for name in ("entropy", "mass", "topk_weight"):
        _close(gpu[name].cpu(), cpu[name], 1e-5, name)


# ---- configs, and an ahead-of-time compile for Hopper (no GPU needed) ------------------------------------------------

def test_autotune_pruning_picks_the_pool_for_the_shape():
    configs = launch.hopper_configs()
    shapes = {name: {launch._shape(c) for c in launch._prune(configs, {"M": m}, HEAD_DIM=d, DOT_PREC=prec)}
              for name, m, d, prec in (("prefill", 4096, 128, "tf32"), ("decode", 1, 128, "tf32"),
                                       ("fp32", 4096, 128, "tf32x3"), ("d256", 4096, 256, "tf32"))}
    assert shapes["prefill"] == set(launch._BIG) and shapes["decode"] == set(launch._SMALL)
    assert shapes["fp32"] == set(launch._FP32)
    assert all(bn * stages <= 192 for _, bn, _, stages in shapes["d256"])
    assert launch.default_config(4096, 128, torch.bfloat16, out_and_stats=True)["BLOCK_N"] == 32
    tuned = launch._tuned_forward()  # builds without a GPU; the autotuner rejects keys that are not arguments
    assert tuned.keys == launch._TUNE_KEY and len(tuned.configs) == len(configs)


@pytest.mark.slow
def test_forward_compiles_for_hopper_with_wgmma_and_no_spills(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    from attnscope.kernels.aot import _tool, compile_forward, compile_row_probs

    if _tool("ptxas") is None:
        pytest.skip("no ptxas in the triton wheel")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # really compile (after the interpreter tests ran)
    for kw in (dict(stats=STATS, want_out=False), dict(stats=STATS)):
        report = compile_forward(n_query=4096, **kw)  # the default (untuned) config of each variant
        assert report["hgmma"] > 0, report  # Hopper warpgroup MMA, not the older mma.sync path
        assert report["local"] == 0 and report["stack"] == 0, report  # no register spills
    # every feature flag at once (4-D keep + bias per row, gates, uniform heads), decode tiles, the second pass
    assert compile_forward(n_query=4096, stats=STATS, mask_kind="window_bias", interventions=True)["hgmma"] > 0
    assert compile_forward(n_query=1, stats=STATS, mask_kind="padding", dtype=torch.float16)["hmma"] > 0
    assert compile_row_probs()["registers"] > 0
