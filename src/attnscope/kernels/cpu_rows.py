"""The fused CPU row kernel of streaming statistics (``cpu_row_statistics.c``): built at first use, loaded by ctypes.

Per row of base-2 logits, a vectorised pass over strided lanes gives the maximum and a bar for the top-k (only keys
at or above it are ranked), and one more pass gives entropy and span masses. The torch path needs about six
whole-array passes (max, subtract, exp2, sum, product, sum) and a per-row ``topk`` call.

Why hand-written C and not a library: no library fuses these reductions on the CPU, ``torch.compile`` would need
the same compiler plus seconds of compilation per shape, and the torch path's cost per row is what kept capture over
its speed target. The C source ships with the package and is compiled with the system C compiler (``$CC``, else
``cc``, about 0.3 s) into ``$ATTNSCOPE_CACHE`` (default ``~/.cache/attnscope``), keyed by the source, the flags and the
CPU, so a machine never loads a library built for another. ``ATTNSCOPE_NATIVE_FLAGS`` adds compiler flags (the tests
build the AVX2 and the plain C variants with ``-mno-avx512f`` and ``-mno-avx2 -mno-avx512f``). Without a compiler,
or with ``ATTNSCOPE_NATIVE=0``, ``row_statistics`` returns None and capture keeps its torch path (same results
within float32 rounding; the trace's provenance says which ran).

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
    return first.get("model name", platform.processor()) + first.get("flags", platform.machine())


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
    return library


def native_available() -> bool:
    """True when the fused kernel is built (or builds now) and loads on this machine."""
    return _library() is not None


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="attnscope-rows")


def _address(tensor: Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def row_statistics(logits: Tensor, *, width: int, extent: Tensor | None, spans: Sequence[tuple[int, int]], k: int,
                   entropy: bool, mass: bool) -> dict[str, Tensor] | None:
    """Statistics of the rows of ``logits`` ``[rows, stride]`` (float32, contiguous, base 2), over the first
    ``width`` keys of each row, or ``extent[row % len(extent)]`` keys (``extent``: integers, repeated over the rows,
    e.g. one causal head's extents for every head); None when the kernel is unavailable.

    Returns ``entropy`` ``[rows]`` (nats), ``mass`` ``[rows, spans]``, ``topk_weight`` and ``topk_index`` (int32)
    ``[rows, k]``, each only when asked (``k`` = 0: no top-k). Rows are split across ``torch.get_num_threads()``
    threads (the C call releases the GIL).
    """
    library = _library()
    if library is None:
        return None
    if not 0 <= k <= MAX_K:
        raise ValueError(f"row_statistics takes top-k up to k = {MAX_K}; got k = {k} (use the torch path)")
    if logits.dtype != torch.float32 or logits.stride(-1) != 1 or logits.ndim != 2:
        raise ValueError(f"row_statistics needs contiguous float32 [rows, keys] logits; got {logits.dtype} "
                         f"{tuple(logits.shape)} with strides {logits.stride()}")
    rows = logits.shape[0]
    out: dict[str, Tensor] = {}
    if entropy:
        out["entropy"] = logits.new_empty(rows)
    if mass:
        out["mass"] = logits.new_empty(rows, len(spans))
    if k:
        out["topk_weight"] = logits.new_empty(rows, k)
        out["topk_index"] = torch.empty(rows, k, dtype=torch.int32)
    span_table = torch.tensor(list(spans) or [(0, 0)], dtype=torch.int64)
    if extent is not None:
        extent = extent.to(torch.int32).contiguous()
    period = 0 if extent is None else extent.numel()
    layout = (logits.stride(0), width, _address(extent), period, span_table.data_ptr(), len(spans), k,
              _address(out.get("entropy")), _address(out.get("mass")), _address(out.get("topk_weight")),
              _address(out.get("topk_index")))
    threads = min(torch.get_num_threads(), rows // _MIN_ROWS_PER_THREAD)
    if threads <= 1:
        library.row_statistics(logits.data_ptr(), 0, rows, *layout)
    else:
        bounds = [rows * i // threads for i in range(threads + 1)]
        calls = [_pool(threads).submit(library.row_statistics, logits.data_ptr(), a, b, *layout)
                 for a, b in zip(bounds, bounds[1:])]
        for call in calls:
            call.result()
    return out
