"""Cell values of the coverage matrix: ``pass``, ``fail: <reason>``, ``unsupported: <reason>``, made short and
deterministic (no object addresses; measured numbers rounded to their order of magnitude)."""

import math
import re
from collections.abc import Callable
from typing import Any

import torch

from ...errors import AttnscopeError, UnsupportedAttentionError, UnsupportedModelError

PASS = "pass"
MAX_REASON = 160
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_FLOAT = re.compile(r"\d+\.\d+e[-+]\d+|\d+\.\d{3,}")


class Verdict(Exception):
    """Raised by a check to end it with a given cell (``fail: ...`` or ``unsupported: ...``)."""

    def __init__(self, cell: str):
        super().__init__(cell)
        self.cell = cell


def magnitude(value: float) -> str:
    """``3.2e-3`` -> ``~1e-03`` (stable across runs whose last bits differ)."""
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    return f"~1e{math.floor(math.log10(abs(value))):+03d}"


def short(text: str) -> str:
    text = _ADDRESS.sub("", " ".join(str(text).split()))
    text = _FLOAT.sub(lambda m: magnitude(float(m.group(0))), text)
    return text if len(text) <= MAX_REASON else text[:MAX_REASON - 3].rstrip() + "..."


def fail(reason: str) -> Verdict:
    return Verdict(f"fail: {short(reason)}")


def describe(error: BaseException) -> str:
    """``TypeName: message``; attnscope errors by what failed and what they got."""
    if isinstance(error, AttnscopeError):
        got = f" (got {error.got})" if error.got not in (None, "") else ""
        return f"{type(error).__name__}: {error.what}{got}"
    message = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {message}"


def cell_of(check: Callable[[], Any]) -> str:
    """Run ``check``: ``pass`` when it returns, its verdict when it raises one; attnscope's Unsupported* errors are
    ``unsupported``, every other exception ``fail``."""
    try:
        check()
        return PASS
    except Verdict as verdict:
        return verdict.cell
    except (UnsupportedModelError, UnsupportedAttentionError) as error:
        return f"unsupported: {short(describe(error))}"
    except Exception as error:  # noqa: BLE001 - every failure is a cell of the matrix
        return f"fail: {short(describe(error))}"


def tensors(output: Any) -> list[torch.Tensor]:
    """Every tensor of a model output (ModelOutput, dict, tuple, list), in order; caches and None skipped."""
    if torch.is_tensor(output):
        return [output]
    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in tensors(item)]
    return []


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    if len(a) != len(b):
        raise fail(f"outputs differ in structure ({len(a)} vs {len(b)} tensors)")
    worst = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            raise fail(f"output shapes differ ({tuple(x.shape)} vs {tuple(y.shape)})")
        if x.numel():
            diff = (x.double() - y.double()).abs()
            both_nan = torch.isnan(x) & torch.isnan(y)
            diff = torch.where(both_nan, torch.zeros_like(diff), torch.nan_to_num(diff, nan=math.inf))
            worst = max(worst, float(diff.max()))
    return worst
