"""Compile the forward kernel ahead of time for a GPU target, without a GPU: does it build, and at what cost.

Uses the same launch arguments as ``launch.forward`` (built on CPU tensors of the requested shapes), Triton's
compiler with an explicit target (``GPUTarget("cuda", 90, 32)`` = Hopper) and the ``ptxas``/``cuobjdump`` that ship
in the triton wheel. Reports registers, spills (local memory), shared memory and whether the SASS uses Hopper's
warpgroup MMA (``HGMMA``) or only ``HMMA``. Lengths barely matter (they are run-time arguments); specialisation
(divisibility by 16) follows the real launch.

Example (takes a few seconds)::

    python -c "from attnscope.kernels.aot import compile_forward; print(compile_forward(stats=('entropy',)))"
"""

import math
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from . import launch
from .problem import dead_rows, normalize


def _tool(name: str) -> str | None:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else shutil.which(name)


def _signature(fn, args: list, meta: dict) -> tuple[dict, dict, dict]:
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    names = fn.arg_names
    signature, constexprs, attrs = {}, dict(meta), {}
    for i, (name, arg) in enumerate(zip(names, args)):
        kind, spec = native_specialize_impl(BaseBackend, arg, False, True, True)
        if kind == "constexpr":
            constexprs[name] = spec
        else:
            attrs[(i,)] = BaseBackend.parse_attr(spec) if isinstance(spec, str) else []
        signature[name] = kind
    for name in meta:
        signature[name] = "constexpr"
    return signature, constexprs, attrs


def _resource_usage(cubin: bytes) -> dict:
    out = {"registers": None, "stack": None, "local": None, "hgmma": None, "hmma": None}
    tool = _tool("cuobjdump")
    if tool is None:
        return out
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        res = subprocess.run([tool, "-res-usage", str(path)], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", str(path)], capture_output=True, text=True).stdout
    for key, pattern in (("registers", r"REG:(\d+)"), ("stack", r"STACK:(\d+)"), ("local", r"LOCAL:(\d+)")):
        found = re.search(pattern, res)
        out[key] = int(found.group(1)) if found else None
    out["hgmma"] = sass.count("HGMMA")
    out["hmma"] = sass.count("HMMA")
    return out


def _compile(fn, args: list, meta: dict, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    meta = dict(meta)
    options = {"num_warps": meta.pop("num_warps"), "num_stages": meta.pop("num_stages"), "enable_fp_fusion": True}
    signature, constexprs, attrs = _signature(fn, args, meta)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    report = {"shared_bytes": compiled.metadata.shared, "arch": arch}
    report.update(_resource_usage(compiled.asm["cubin"]))
    return report


def _problem(dtype, batch, heads, kv_heads, n_query, n_key, head_dim, is_causal, mask_kind, interventions, stats,
             topk, mass_spans, want_out):
    q = torch.zeros(batch, n_query, heads, head_dim, dtype=dtype).transpose(1, 2)  # HF layout
    k = torch.zeros(batch, n_key, kv_heads, head_dim, dtype=dtype).transpose(1, 2)
    mask = None
    if mask_kind == "padding":  # left padding: dead rows under causality
        mask = torch.ones(batch, n_key, dtype=torch.long)
        mask[:, 0] = 0
    elif mask_kind == "window_bias":  # a per-head 4-D additive mask: keep and bias loaded per row
        mask = torch.zeros(1, heads, n_query, n_key)
        mask[..., 0] = -math.inf
        mask[..., 1:] = -0.5
    gate = uniform = None
    if interventions:
        gate, uniform = torch.rand(heads), torch.arange(heads) % 2 == 0
    return normalize(q, k, k if want_out else None, mask, scaling=head_dim ** -0.5, is_causal=is_causal,
                     stats=stats, mass_spans=mass_spans, topk=topk, gate=gate, uniform=uniform)


def compile_forward(*, dtype: torch.dtype = torch.bfloat16, batch: int = 1, heads: int = 32, kv_heads: int = 8,
                    n_query: int = 256, n_key: int = 256, head_dim: int = 128, is_causal: bool = True,
                    mask_kind: str | None = None, interventions: bool = False, stats: Sequence[str] = (),
                    topk: int = 5, mass_spans: Sequence[tuple[int, int]] = ((0, 1),), want_out: bool = True,
                    config: dict | None = None, arch: int = 90) -> dict:
    """Compile one forward variant for ``sm_<arch>`` and report its resources.

    mask_kind: None, ``"padding"`` (a [batch, key] mask with dead rows) or ``"window_bias"`` (4-D keep + bias).
    """
    pb = _problem(dtype, batch, heads, kv_heads, n_query, n_key, head_dim, is_causal, mask_kind, interventions,
                  stats, topk, mass_spans, want_out)
    args, meta, _ = launch.forward_args(pb, dead_rows(pb), want_out)
    both = want_out and bool(stats)
    cfg = dict(config or launch.default_config(n_query, head_dim, dtype, both))
    report = _compile(launch.kernel_module(False)._attn_fwd_kernel, args, {**meta, **cfg}, arch)
    return {"config": cfg, **report}


def compile_row_probs(*, dtype: torch.dtype = torch.bfloat16, heads: int = 32, kv_heads: int = 8,
                      n_query: int = 256, n_key: int = 256, head_dim: int = 128, mask_kind: str | None = "padding",
                      interventions: bool = True, arch: int = 90) -> dict:
    """Compile the row-probabilities kernel (second pass over the log-sum-exp) and report its resources."""
    pb = _problem(dtype, 1, heads, kv_heads, n_query, n_key, head_dim, True, mask_kind, interventions, (), 0,
                  (), False)
    lse = torch.zeros(1, heads, n_query)
    args, meta, _, _ = launch.row_probs_args(pb, dead_rows(pb), lse, torch.arange(4), interpret=False)
    return _compile(launch.kernel_module(False)._row_probs_kernel, args, meta, arch)
