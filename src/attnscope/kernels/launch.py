"""Host side of the Triton kernels: which copy of the kernels runs (compiled or interpreted), configs, launches.

Compiled kernels need a CUDA device; CPU tensors always run through Triton's interpreter. The interpreter is
chosen per call, not by the ``TRITON_INTERPRET`` variable at import time (some libraries, diffusers among them,
import triton long before a test module could set it): ``kernel_module(interpret=True)`` loads a second copy of
``triton_attention.py`` with interpretation switched on for its decorators only, and ``interpreter_scope`` swaps
triton's own ``@jit`` library functions (``tl.sum``, ``tl.zeros`` ...) for interpreted twins during the launch.
Compiled and interpreted kernels thus live side by side in one process (pytest-xdist workers included).

Configs: on CUDA the forward is autotuned over Hopper-sized tiles (BLOCK_M 64/128, BLOCK_N 32/64/128, 4/8 warps,
2-4 stages; 16/32-row tiles for decode-like calls; a small set for float32), keyed on power-of-two length buckets,
the dtype and the kernel's feature flags; ``ATTNSCOPE_TRITON_AUTOTUNE=0`` uses one default config instead. The
interpreter always uses one small fixed config (16 x 16 tiles). float32 dots use ``tf32x3`` on CUDA (near-fp32
accuracy on tensor cores; ``ATTNSCOPE_FP32_DOT=ieee`` for exact fp32 FMA dots, which spill registers).
"""

import contextlib
import importlib.util
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from .problem import Problem

_KERNEL_FILE = Path(__file__).with_name("triton_attention.py")
_CACHE: dict[str, object] = {}
_TUNED: dict[str, object] = {}
MAX_TOPK = 8
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
ROW_PROBS_CONFIG = {"BLOCK_R": 16, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2}


def triton_available() -> bool:
    """True when ``triton`` imports (compiled kernels additionally need CUDA tensors)."""
    if "ok" not in _CACHE:
        try:
            import triton  # noqa: F401
            _CACHE["ok"] = True
        except Exception:  # noqa: BLE001 - any import failure means: no Triton
            _CACHE["ok"] = False
    return bool(_CACHE["ok"])


def kernel_module(interpret: bool):
    """The kernel module: the compiled one, or a copy whose ``@triton.jit`` functions run in the interpreter."""
    if not interpret:
        from . import triton_attention
        return triton_attention
    if "module" not in _CACHE:
        import triton

        spec = importlib.util.spec_from_file_location("attnscope.kernels._triton_attention_interpreted",
                                                      _KERNEL_FILE)
        module = importlib.util.module_from_spec(spec)
        with triton.knobs.runtime.scope():
            triton.knobs.runtime.interpret = True
            spec.loader.exec_module(module)
        _CACHE["module"] = module
    return _CACHE["module"]


_SWAP_LOCK = threading.Lock()
_TWINS: dict[int, object] = {}  # id(JITFunction of triton.language) -> its interpreted twin
_MISSING = object()


def _language_objects() -> list:
    """Every object the interpreter patches: the ``triton.language`` modules and the classes it edits."""
    import triton.language as tl

    objects = [m for name, m in list(sys.modules.items())
               if m is not None and (name == "triton.language" or name.startswith("triton.language."))]
    for owner, attr in ((tl.core, "tensor"), (tl.core, "dtype"), (tl, "condition"), (tl.core, "condition"),
                        (tl.core, "tensor_descriptor_base")):
        cls = getattr(owner, attr, None)
        if cls is not None and cls not in objects:
            objects.append(cls)
    return objects


def _restore(obj, saved: dict) -> None:
    current = dict(vars(obj))
    if not isinstance(obj, type(sys)):  # modules keep names the interpreter adds (its rewritten code uses them)
        for name in current.keys() - saved.keys():
            delattr(obj, name)
    for name, value in saved.items():
        if current.get(name, _MISSING) is not value:
            setattr(obj, name, value)


@contextlib.contextmanager
def interpreter_scope() -> Iterator[None]:
    """Run interpreted kernels although triton was imported in compiled mode; everything restored on exit.

    Swaps triton's ``@jit`` library functions for interpreted twins, and undoes every patch the interpreter makes
    to ``triton.language`` (its device-function calls patch without restoring, which would break later compiles).
    With ``TRITON_INTERPRET=1`` set before triton's import there is nothing to swap. Like Triton's own interpreter,
    this is not meant to overlap a compilation in another thread.
    """
    import numpy as np
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    with contextlib.suppress(ImportError):  # imported lazily by argument handling; it checks for JITFunctions
        importlib.import_module("triton.experimental.gluon")
    with _SWAP_LOCK, np.errstate(invalid="ignore", over="ignore", divide="ignore"):  # -inf - -inf in masked lanes
        snapshot = [(obj, dict(vars(obj))) for obj in _language_objects()]
        try:
            for obj, saved in snapshot:
                if isinstance(obj, type(sys)):
                    for attr, value in saved.items():
                        if isinstance(value, JITFunction):
                            if id(value) not in _TWINS:
                                _TWINS[id(value)] = InterpretedFunction(value.fn)
                            setattr(obj, attr, _TWINS[id(value)])
            yield
        finally:
            for obj, saved in reversed(snapshot):
                _restore(obj, saved)


def uses_interpreter(device: torch.device) -> bool:
    """CPU tensors, or ``TRITON_INTERPRET=1`` set before the kernels were imported."""
    if device.type != "cuda":
        return True
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel_module(False)._attn_fwd_kernel, InterpretedFunction)


# (BLOCK_M, BLOCK_N, num_warps, num_stages). Checked by ahead-of-time compiles for sm_90 (``aot.py``,
# ``benchmarks/bench_kernels.py --aot``; table in NOTES.md): all use warpgroup MMA; 128x64/8 warps has no spills for
# output-only and statistics-only, 128x32/8 warps none for output + statistics. Left out: 4-warp 128-row tiles
# (spill), 128x128 with 3 stages (256 KB of shared memory with values: does not fit).
_BIG = [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3), (64, 64, 4, 4),
        (64, 32, 4, 3)]
_SMALL = [(16, 128, 4, 3), (32, 64, 4, 3)]  # few query rows (decode): mma.sync tiles
_FP32 = [(64, 32, 4, 2), (64, 32, 4, 3), (128, 32, 8, 2)]  # fp32 (tf32x3 dots): shared memory bound


def hopper_configs() -> list:
    import triton

    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in dict.fromkeys(_BIG + _SMALL + _FP32)]


def _shape(c) -> tuple[int, int, int, int]:
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages


def _prune(configs, named_args, **meta):
    if meta.get("DOT_PREC") != "tf32":
        pool = _FP32
    elif named_args["M"] <= 32:
        pool = _SMALL
    else:
        pool = _BIG
    kept = [c for c in configs if _shape(c) in pool]
    if meta.get("HEAD_DIM", 128) > 128:  # shared memory: no wide key tiles with deep pipelines
        kept = [c for c in kept if c.kwargs["BLOCK_N"] * c.num_stages <= 192] or kept
    return kept or configs[:1]


def default_config(m: int, d: int, dtype: torch.dtype = torch.bfloat16, out_and_stats: bool = False) -> dict:
    """The config used without autotuning (``ATTNSCOPE_TRITON_AUTOTUNE=0``)."""
    if dtype == torch.float32:
        bm, bn, w, s = _FP32[0]
    elif m <= 32:
        bm, bn, w, s = _SMALL[0]
    else:
        bm, bn, w, s = (128, 32, 8, 3) if out_and_stats or d > 128 else (128, 64, 8, 3)
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s}


_TUNE_KEY = ["M_BUCKET", "N_BUCKET", "HEAD_DIM", "HEAD_DIM_V", "IS_CAUSAL", "HAS_KEEP", "HAS_BIAS", "HAS_DEAD",
             "WANT_OUT", "WANT_ENT", "N_SPANS", "TOPK", "DOT_PREC"]


def _tuned_forward():
    if "fwd" not in _TUNED:
        import triton

        _TUNED["fwd"] = triton.autotune(configs=hopper_configs(), key=_TUNE_KEY,
                                        prune_configs_by={"early_config_prune": _prune})(
            kernel_module(False)._attn_fwd_kernel)
    return _TUNED["fwd"]


def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _strides4(t: Tensor | None) -> tuple[int, int, int, int]:
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)


def _mask_args(pb: Problem, dead: Tensor | None, dummy: Tensor) -> tuple[list, dict]:
    b, h, m, n = pb.shape
    keep = pb.keep.view(torch.uint8).expand(b, h, m, n) if pb.keep is not None else None
    bias = pb.bias.expand(b, h, m, n) if pb.bias is not None else None
    dead_u = dead.view(torch.uint8).expand(b, h, m) if dead is not None else None
    uni = pb.uniform.view(torch.uint8).expand(b, h) if pb.uniform is not None else None
    ptrs = [uni if uni is not None else dummy, keep if keep is not None else dummy,
            bias if bias is not None else dummy, dead_u if dead_u is not None else dummy]
    strides = [*(uni.stride() if uni is not None else (0, 0)), *_strides4(keep), *_strides4(bias),
               *(dead_u.stride() if dead_u is not None else (0, 0, 0))]
    flags = dict(IS_CAUSAL=pb.is_causal, HAS_KEEP=keep is not None,
                 KEEP_PER_ROW=keep is not None and keep.stride(2) != 0, HAS_BIAS=bias is not None,
                 BIAS_PER_ROW=bias is not None and bias.stride(2) != 0, HAS_DEAD=dead_u is not None,
                 HAS_UNIF=uni is not None,
                 DOT_PREC=os.environ.get("ATTNSCOPE_FP32_DOT", "tf32x3") if pb.query.dtype == torch.float32 else "tf32",
                 DOT_F32=pb.query.dtype == torch.bfloat16 and uses_interpreter(pb.query.device))
    return ptrs + strides, flags


def forward_args(pb: Problem, dead: Tensor | None, want_out: bool) -> tuple[list, dict, dict]:
    """(positional arguments, constexpr meta-parameters, output buffers) of one forward launch."""
    b, h, m, n = pb.shape
    q, k = pb.query, pb.key
    d = q.shape[-1]
    device = q.device
    want_out = want_out and pb.value is not None
    v = pb.value if want_out else k
    dv = v.shape[-1]
    f32 = dict(device=device, dtype=torch.float32)
    bufs = {"lse": torch.empty(b, h, m, **f32)}
    if want_out:
        bufs["out"] = torch.empty(b, m, h, dv, device=device, dtype=q.dtype).transpose(1, 2)
    if "entropy" in pb.stats:
        bufs["entropy"] = torch.empty(b, h, m, **f32)
    if pb.spans:
        bufs["mass"] = torch.empty(b, h, m, len(pb.spans), **f32)
    if pb.topk:
        bufs["topk_value"] = torch.empty(b, h, m, pb.topk, **f32)
        bufs["topk_index"] = torch.empty(b, h, m, pb.topk, device=device, dtype=torch.int32)
    dummy = bufs["lse"]
    spans = torch.tensor(pb.spans, device=device, dtype=torch.int32).reshape(-1) if pb.spans else dummy
    gate, out = pb.gate, bufs.get("out")
    mask_ptrs_strides, flags = _mask_args(pb, dead, dummy)
    uni, keep, bias, dead_u, *mask_strides = mask_ptrs_strides
    ptrs = [q, k, v] + [bufs.get(name, dummy) for name in ("out", "lse", "entropy", "mass", "topk_value",
                                                             "topk_index")]
    ptrs += [pb.kv_index, gate if gate is not None else dummy, uni, keep, bias, dead_u, spans]
    strides = [*q.stride(), *k.stride(), *v.stride(), *(out.stride() if out is not None else (0, 0, 0, 0)),
               gate.stride(0) if gate is not None and gate.shape[0] > 1 else 0,
               gate.stride(1) if gate is not None else 0, *mask_strides]
    meta = dict(HEAD_DIM=d, HEAD_DIM_V=dv, BLOCK_D=max(16, _pow2(d)), BLOCK_DV=max(16, _pow2(dv)),
                HAS_GATE=gate is not None, WANT_OUT=want_out, WANT_ENT="entropy" in pb.stats, N_SPANS=len(pb.spans),
                SPAN_PAD=max(2, _pow2(len(pb.spans))), TOPK=pb.topk, TOPK_PAD=max(2, _pow2(pb.topk)), **flags)
    scalars = [h, m, n, pb.scaling, _pow2(m), _pow2(n)]
    return ptrs + strides + scalars, meta, bufs


def forward(pb: Problem, dead: Tensor | None, *, want_out: bool = True, config: dict | None = None) -> dict:
    """Run the fused forward: ``out [B, H, M, Dv]`` (if ``want_out``), ``lse`` and the requested statistics.

    config: ``{"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}`` to skip autotuning (CUDA only).
    """
    b, h, m, _ = pb.shape
    interpret = uses_interpreter(pb.query.device)
    args, meta, bufs = forward_args(pb, dead, want_out)
    if interpret or config is not None or os.environ.get("ATTNSCOPE_TRITON_AUTOTUNE", "1") == "0":
        both = meta["WANT_OUT"] and (meta["WANT_ENT"] or meta["N_SPANS"] > 0 or meta["TOPK"] > 0)
        cfg = dict(INTERPRETER_CONFIG if interpret else
                   (config or default_config(m, meta["HEAD_DIM"], pb.query.dtype, both)))
        kernel = kernel_module(interpret)._attn_fwd_kernel
        with interpreter_scope() if interpret else contextlib.nullcontext():
            kernel[(-(-m // cfg["BLOCK_M"]), b * h)](*args, **meta, **cfg)
    else:
        def grid(meta_):
            return (-(-m // meta_["BLOCK_M"]), b * h)
        _tuned_forward()[grid](*args, **meta)
    if "topk_value" in bufs:
        bufs["topk_weight"], bufs["topk_index"] = _sort_topk(bufs.pop("topk_value"), bufs["topk_index"],
                                                             bufs["lse"])
    return bufs


def _sort_topk(values: Tensor, index: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    """Order the kernel's unsorted top-k by logit (descending), ties by key index; weights ``exp(s - lse)``."""
    by_index = torch.argsort(torch.where(index < 0, torch.iinfo(torch.int32).max, index), dim=-1, stable=True)
    values, index = values.gather(-1, by_index), index.gather(-1, by_index)
    by_value = torch.argsort(values, dim=-1, descending=True, stable=True)
    values, index = values.gather(-1, by_value), index.gather(-1, by_value)
    return torch.exp(values - lse[..., None]), index


def row_probs_args(pb: Problem, dead: Tensor | None, lse: Tensor, rows: Tensor, interpret: bool) -> tuple:
    """(positional arguments, meta-parameters with the config, grid, output) of one row-probabilities launch."""
    b, h, m, n = pb.shape
    q, k = pb.query, pb.key
    rows = torch.as_tensor(rows, device=q.device).to(torch.int32).contiguous()
    r = rows.numel()
    probs = torch.empty(b, h, r, n, device=q.device, dtype=torch.float32)
    mask_ptrs_strides, flags = _mask_args(pb, dead, lse)
    uni, keep, bias, dead_u, *mask_strides = mask_ptrs_strides
    cfg = dict(ROW_PROBS_CONFIG)
    if interpret:
        cfg.update(BLOCK_N=16, num_stages=1)
    grid = (-(-n // cfg["BLOCK_N"]), b * h, -(-r // cfg["BLOCK_R"]))
    args = [q, k, lse, rows, probs, pb.kv_index, uni, keep, bias, dead_u, *q.stride(), *k.stride(), *mask_strides,
            h, m, n, r, pb.scaling]
    meta = dict(HEAD_DIM=q.shape[-1], BLOCK_D=max(16, _pow2(q.shape[-1])), **flags, **cfg)
    return args, meta, grid, probs


def row_probs(pb: Problem, dead: Tensor | None, lse: Tensor, rows: Tensor) -> Tensor:
    """Second pass over ``lse``: probabilities ``[B, H, len(rows), N]`` (float32) of the query rows ``rows``."""
    interpret = uses_interpreter(pb.query.device)
    args, meta, grid, probs = row_probs_args(pb, dead, lse, rows, interpret)
    if probs.shape[2] == 0:
        return probs
    with interpreter_scope() if interpret else contextlib.nullcontext():
        kernel_module(interpret)._row_probs_kernel[grid](*args, **meta)
    return probs
