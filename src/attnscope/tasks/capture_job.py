"""``attnscope capture``: load a model by reference, capture what the job asks for, write the trace.

Example:
    >>> import tempfile, pathlib
    >>> from attnscope.tasks.capture_job import CaptureJob, run_capture_job
    >>> from attnscope.tasks.references import ModelRef
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "trace.safetensors"
    >>> trace, path = run_capture_job(CaptureJob(ModelRef.parse("minilm"), ["Hello world"], out, {"stats": ("entropy",)}))
    >>> path == out, len(trace.sites)
    (True, 6)
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._atomic import check_output
from ..probes.capturing import capture
from ..probes.trace import AttentionTrace
from .models import load_ref
from .references import ModelRef
from .._progress import stage


@dataclass(frozen=True)
class CaptureJob:
    """A model, its inputs (texts, token ids or what the family takes), where the trace goes, and the keyword
    arguments of ``attnscope.capture`` (heads, rows, stats, mass_spans, topk, patterns, implementation)."""

    model: ModelRef
    inputs: Any
    out: "Path | str"
    options: dict[str, Any] = field(default_factory=dict)


def run_capture_job(job: CaptureJob) -> tuple[AttentionTrace, Path]:
    """Check the output path (before any work), load, capture, save; returns the trace and where it went."""
    out = check_output(job.out)
    model = load_ref(job.model)
    stage("capturing")
    trace = capture(model, job.inputs, **job.options)
    return trace, trace.save(out)
