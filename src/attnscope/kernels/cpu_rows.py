"""The fused CPU kernel of streaming statistics (``cpu_row_statistics.c``): built at first use, loaded by ctypes.

Per row of base-2 logits, a vectorised pass over strided lanes gives the maximum and a bar for the top-k (only keys
at or above it are ranked), and one more pass gives entropy and span masses. The torch path needs about six
whole-array passes (max, subtract, exp2, sum, product, sum) and a per-row ``topk`` call. ``row_statistics`` reads
logits computed elsewhere (masked attention); ``qk_row_statistics`` computes them itself from queries and keys,
eight rows at a time (every loaded key vector feeds eight rows' FMAs) into a scratch that stays in cache.

Why hand-written C and not a library: no library fuses these reductions on the CPU, ``torch.compile`` would need
the same compiler plus seconds of compilation per shape, and the torch path's cost per row is what kept capture over
its speed target. The small query-key product is hand-written too (8 rows x 32 keys of FMAs per step): a library
GEMM must write the logits out, and the reductions then read them back from a cold cache. Fused, the statistics
of 8 causal heads of 32 cost 40% less at 512 tokens and 25% less at 4096. The C source ships with the package
and is compiled with the system C compiler (``$CC``, else ``cc``, about 0.3 s) into ``$ATTNSCOPE_CACHE`` (default
``~/.cache/attnscope``), keyed by the source, the flags and the CPU, so a machine never loads a library built for
another. ``ATTNSCOPE_NATIVE_FLAGS`` adds compiler flags (the tests build the AVX2 and the plain C variants with
``-mno-avx512f`` and ``-mno-avx2 -mno-avx512f``). Without a compiler, or with ``ATTNSCOPE_NATIVE=0``, both
functions return None and capture keeps its torch path (same results within float32 rounding; the trace's
provenance says which ran).

Example:
    >>> import torch
    >>> from attnscope.kernels.cpu_rows import row_statistics
    >>> logits = torch.tensor([[0.0, 1.0, -1e30, 1.0]])  # base 2: weights 1/5, 2/5, 0, 2/5
    >>> out = row_statistics(logits, width=4, extent=None, spans=[(0, 1)], k=2, entropy=True, mass=True)
    >>> [round(w, 4) for w in out["topk_weight"][0].tolist()], out["topk_index"][0].tolist()
    ([0.4, 0.4], [1, 3])
    >>> round(out["mass"][0, 0].item(), 4)
    0.2
"""

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

_SOURCE = Path(__file__).with_name("cpu_row_statistics.c")
_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fPIC", "-shared", "-std=c11"]
_MIN_ROWS_PER_THREAD = 64  # below this a thread hand-off costs more than it saves
MAX_K = 256  # top-k slots of the kernel (MAX_K in the C source): larger k takes the torch path


def _cpu_signature() -> str:
    """The CPU model and instruction-set flags (``-march=native`` code must not run on another CPU)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    first = {}
    for line in lines:
        first.setdefault(line.split(":")[0].strip(), line)
    return (first.get("model name") or platform.processor()) + (first.get("flags") or platform.machine())


def _cache_dir() -> Path:
    root = os.environ.get("ATTNSCOPE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"),
                                                     "attnscope")
    return Path(root) / "native"


def _build(compiler: str, flags: list[str], target: Path) -> None:
    """Compile into a temporary file next to ``target`` and move it in place (safe when processes race)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(handle)
    try:
        subprocess.run([compiler, *flags, str(_SOURCE), "-o", partial, "-lm"], check=True, capture_output=True,
                       timeout=120)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("ATTNSCOPE_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    flags = [*_FLAGS, *os.environ.get("ATTNSCOPE_NATIVE_FLAGS", "").split()]
    key = hashlib.sha256("\0".join([_SOURCE.read_text(), *flags, compiler, _cpu_signature()]).encode()).hexdigest()
    target = _cache_dir() / f"cpu_row_statistics-{key[:20]}.so"
    try:
        if not target.exists():
            _build(compiler, flags, target)
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", b"") or b""
        warnings.warn(f"attnscope: the fused CPU statistics kernel did not build ({error}; "
                      f"{detail.decode(errors='replace')[:300]}); capture uses its torch path", stacklevel=2)
        return None
    pointer, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    library.row_statistics.argtypes = [pointer, i64, i64, i64, i64, pointer, i64, pointer, i32, i32, pointer,
                                       pointer, pointer, pointer]
    library.row_statistics.restype = None
    library.qk_row_statistics.argtypes = [pointer, pointer, i64, i64, i64, i64, i64, i64, i32, pointer, i32, i32,
                                          pointer, pointer, pointer, pointer]
    library.qk_row_statistics.restype = ctypes.c_int
    return library


def native_available() -> bool:
    """True when the fused kernel is built (or builds now) and loads on this machine."""
    return _library() is not None


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="attnscope-rows")


def _address(tensor: Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _outputs(rows: int, spans: Sequence[tuple[int, int]], k: int, entropy: bool, mass: bool) -> dict[str, Tensor]:
    if not 0 <= k <= MAX_K:
        raise ValueError(f"the fused CPU kernel takes top-k up to k = {MAX_K}; got k = {k} (use the torch path)")
    out: dict[str, Tensor] = {}
    if entropy:
        out["entropy"] = torch.empty(rows)
    if mass:
        out["mass"] = torch.empty(rows, len(spans))
    if k:
        out["topk_weight"] = torch.empty(rows, k)
        out["topk_index"] = torch.empty(rows, k, dtype=torch.int32)
    return out


def _output_addresses(out: dict[str, Tensor]) -> tuple[int | None, ...]:
    return tuple(_address(out.get(name)) for name in ("entropy", "mass", "topk_weight", "topk_index"))


def _over_threads(call, rows: int) -> list:
    """``call(first, last)`` over ``rows`` rows, split across ``torch.get_num_threads()`` threads (the C calls
    release the GIL); the return values in order."""
    threads = min(torch.get_num_threads(), rows // _MIN_ROWS_PER_THREAD)
    if threads <= 1:
        return [call(0, rows)]
    bounds = [rows * i // threads for i in range(threads + 1)]
    calls = [_pool(threads).submit(call, a, b) for a, b in zip(bounds, bounds[1:])]
    return [c.result() for c in calls]


def row_statistics(logits: Tensor, *, width: int, extent: Tensor | None, spans: Sequence[tuple[int, int]], k: int,
                   entropy: bool, mass: bool) -> dict[str, Tensor] | None:
    """Statistics of the rows of ``logits`` ``[rows, stride]`` (float32, contiguous, base 2), over the first
    ``width`` keys of each row, or ``extent[row % len(extent)]`` keys (``extent``: integers, repeated over the rows,
    e.g. one causal head's extents for every head); None when the kernel is unavailable.

    Returns ``entropy`` ``[rows]`` (nats), ``mass`` ``[rows, spans]``, ``topk_weight`` and ``topk_index`` (int32)
    ``[rows, k]``, each only when asked (``k`` = 0: no top-k).
    """
    library = _library()
    if library is None:
        return None
    if logits.dtype != torch.float32 or logits.stride(-1) != 1 or logits.ndim != 2:
        raise ValueError(f"row_statistics needs contiguous float32 [rows, keys] logits; got {logits.dtype} "
                         f"{tuple(logits.shape)} with strides {logits.stride()}")
    out = _outputs(logits.shape[0], spans, k, entropy, mass)
    span_table = torch.tensor(list(spans) or [(0, 0)], dtype=torch.int64)
    if extent is not None:
        extent = extent.to(torch.int32).contiguous()
    period = 0 if extent is None else extent.numel()
    layout = (logits.stride(0), width, _address(extent), period, span_table.data_ptr(), len(spans), k,
              *_output_addresses(out))
    _over_threads(lambda a, b: library.row_statistics(logits.data_ptr(), a, b, *layout), logits.shape[0])
    return out


def qk_row_statistics(query: Tensor, key_t: Tensor, *, causal: bool, spans: Sequence[tuple[int, int]], k: int,
                      entropy: bool, mass: bool) -> dict[str, Tensor] | None:
    """The same statistics straight from ``query`` ``[heads, n_query, d]`` (base-2 scaled logits: ``q . k``) and
    ``key_t`` ``[kv_heads, d, n_key]`` (float32, contiguous; with grouped-query attention, query head ``h`` reads key
    head ``h // (heads // kv_heads)``), without a mask: the logits are computed a few rows at a time in a
    cache-resident scratch and never stored. ``causal``: query i sees keys ``<= i + n_key - n_query``; a row that
    sees none attends uniformly. Outputs are ``[heads * n_query, ...]``; None when the kernel is unavailable.

    Example:
        >>> import torch
        >>> from attnscope.kernels.cpu_rows import qk_row_statistics
        >>> q, kt = torch.ones(1, 2, 1), torch.tensor([[[0.0, 1.0]]])  # row 0 sees key 0 only; row 1 both
        >>> out = qk_row_statistics(q, kt, causal=True, spans=[(0, 1)], k=0, entropy=False, mass=True)
        >>> [round(m, 4) for m in out["mass"].flatten().tolist()]  # weights 1 and 2^0 / (2^0 + 2^1)
        [1.0, 0.3333]
    """
    library = _library()
    if library is None:
        return None
    heads, n_query, d = query.shape
    kv_heads = key_t.shape[0]
    if (query.dtype != torch.float32 or key_t.dtype != torch.float32 or not query.is_contiguous()
            or not key_t.is_contiguous() or key_t.ndim != 3 or key_t.shape[1] != d or heads % max(kv_heads, 1)):
        raise ValueError(f"qk_row_statistics needs contiguous float32 query [heads, n_query, d] and key_t "
                         f"[kv_heads, d, n_key] with kv_heads dividing heads; got {tuple(query.shape)} {query.dtype} "
                         f"and {tuple(key_t.shape)} {key_t.dtype}")
    n_key = key_t.shape[-1]
    out = _outputs(heads * n_query, spans, k, entropy, mass)
    span_table = torch.tensor(list(spans) or [(0, 0)], dtype=torch.int64)
    layout = (n_query, n_key, d, heads // kv_heads, int(causal), span_table.data_ptr(), len(spans), k,
              *_output_addresses(out))
    codes = _over_threads(lambda a, b: library.qk_row_statistics(query.data_ptr(), key_t.data_ptr(), a, b, *layout),
                          heads * n_query)
    if any(codes):
        raise MemoryError("qk_row_statistics: no memory for its scratch rows")
    return out
