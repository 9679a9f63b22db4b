"""``attnscope remote-capture``: one capture (and intervention plan) in an nnsight trace, written as a trace file.

Remotely (``local_sim=False``) the model is a hub id the NDIF-compatible backend serves: only its config is read
here, the weights stay remote. With ``local_sim`` the model is loaded here (placed by ``device_map``) and the
request is serialised as for the backend but run locally.

Example:
    >>> import tempfile, pathlib
    >>> from attnscope.tasks.references import ModelRef
    >>> from attnscope.tasks.remote_capture_job import RemoteCaptureJob, run_remote_capture_job
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "r.safetensors"
    >>> job = RemoteCaptureJob(ModelRef.parse("minilm"), ["Hello world"], out, local_sim=True,
    ...                        options={"stats": ("entropy",)})
    >>> trace, path = run_remote_capture_job(job)
    >>> path == out, len(trace.sites)
    (True, 6)
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._atomic import check_output
from ..probes.interventions import InterventionPlan
from ..probes.remote import remote_capture
from ..probes.trace import AttentionTrace
from .models import load_ref
from .references import ModelRef


@dataclass(frozen=True)
class RemoteCaptureJob:
    """The model, its texts, where the trace goes, a plan applied in the trace, the backend (``local_sim``: nnsight's
    local simulation, with the model placed by ``device_map``), the nnsight ``task`` and the keyword arguments of
    ``attnscope.capture`` (heads, rows, stats, mass_spans, topk)."""

    model: ModelRef
    inputs: list[str]
    out: "Path | str"
    plan: InterventionPlan | None = None
    local_sim: bool = False
    device_map: Any = None
    task: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


def run_remote_capture_job(job: RemoteCaptureJob) -> tuple[AttentionTrace, Path]:
    """Check the output path (before any work), capture through nnsight, save; returns the trace and its path."""
    out = check_output(job.out)
    if job.local_sim:
        model: Any = load_ref(job.model, device_map=job.device_map)
        remote: "bool | str" = "local"
    else:
        model, remote = str(job.model), True  # a hub id: only its config is read here, the weights stay remote
    trace = remote_capture(model, job.inputs, remote=remote, plan=job.plan, task=job.task, **job.options)
    return trace, trace.save(out)
