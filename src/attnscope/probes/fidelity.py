"""``validate(model)``: check on a sample input that capture is faithful.

Checks: (1) capture is observational: outputs with and without capture are equal (bit-identical when the same
kernel runs, within ``atol`` otherwise); (2) captured probabilities equal an independent reference (the model's
own eager attention weights, or the adapter's reference processor) within ``atol``; (3) rows sum to 1 (at most 1
where learned attention sinks take mass);
(4) causal masks hold (no mass above the diagonal) at causal sites.

Example:
    >>> import attnscope
    >>> report = attnscope.probes.validate(attnscope.load("minilm"))
    >>> report.ok
    True
"""

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import CaptureError
from .adapter import ModelLike, as_adapter
from .capturing import capture


@dataclass
class ValidationReport:
    """Outcome of ``validate``: one entry per check, with the worst deviation seen."""

    adapter: str
    attention_path: str = ""
    output_max_diff: float = 0.0
    output_bit_identical: bool = False
    probs_max_diff: float = 0.0
    row_sum_max_diff: float = 0.0
    causal_leak: float = 0.0
    n_sites: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def __str__(self) -> str:
        status = "OK" if self.ok else "FAILED: " + "; ".join(self.failures)
        return (f"{self.adapter} [{self.attention_path}] sites={self.n_sites} output_diff={self.output_max_diff:.2e} "
                f"(bit-identical={self.output_bit_identical}) probs_diff={self.probs_max_diff:.2e} "
                f"row_sum_diff={self.row_sum_max_diff:.2e} causal_leak={self.causal_leak:.2e}: {status}")


def _tensors(output: Any) -> list[torch.Tensor]:
    if torch.is_tensor(output):
        return [output]
    if isinstance(output, dict) or hasattr(output, "to_tuple"):
        values = output.values() if isinstance(output, dict) else output.to_tuple()
        return [t for v in values for t in _tensors(v)]
    if isinstance(output, (tuple, list)):
        return [t for v in output for t in _tensors(v)]
    return []


def _compare_outputs(report: ValidationReport, base: Any, captured: Any, atol: float) -> None:
    a, b = _tensors(base), _tensors(captured)
    if len(a) != len(b) or not a:
        report.failures.append(f"outputs differ in structure ({len(a)} vs {len(b)} tensors)")
        return
    report.output_bit_identical = all(torch.equal(x, y) for x, y in zip(a, b))
    report.output_max_diff = max(float((x.float() - y.float()).abs().max()) if x.numel() else 0.0
                                 for x, y in zip(a, b))
    if report.output_max_diff > atol:
        report.failures.append(f"capture changed the output by {report.output_max_diff:.2e} > {atol}")


def _real_queries(trace: Any, batch: int, n_query: int) -> torch.Tensor:
    """``[batch, query]`` True where the query is a real token (not padding)."""
    padding = trace.tokens.padding
    if not padding or len(padding) != batch or len(padding[0]) != n_query:
        return torch.ones(batch, n_query, dtype=torch.bool)
    return torch.tensor(padding, dtype=torch.bool)


def _check_probs(report: ValidationReport, trace: Any, reference: dict, causal_sites: set, atol: float) -> None:
    for (site, step), rec in trace.records.items():
        probs = rec.probs
        sums = probs.sum(-1)  # learned sinks take mass that no key gets: those rows sum to at most 1
        off = (sums - 1).clamp_min(0) if rec.meta.get("attention_sinks") else (sums - 1).abs()
        report.row_sum_max_diff = max(report.row_sum_max_diff, float(off.max()))
        if site in causal_sites and probs.shape[-2] > 1:
            n_q, n_k = probs.shape[-2], probs.shape[-1]
            upper = torch.ones(n_q, n_k, dtype=torch.bool).triu(1 + n_k - n_q)
            real = _real_queries(trace, probs.shape[0], n_q)  # padding queries attend uniformly, as in eager
            leak = probs.masked_fill(~upper, 0).amax(-1).amax(1)[real]
            report.causal_leak = max(report.causal_leak, float(leak.max()) if leak.numel() else 0.0)
        refs = reference.get(site)
        if refs is None or step >= len(refs):
            report.failures.append(f"no reference probabilities for {site} step {step}")
            continue
        diff = float((refs[step] - probs).abs().max())
        report.probs_max_diff = max(report.probs_max_diff, diff)
    if report.probs_max_diff > atol:
        report.failures.append(f"captured probabilities differ from the reference by {report.probs_max_diff:.2e}")
    if report.row_sum_max_diff > atol:
        report.failures.append(f"rows do not sum to 1 (off by {report.row_sum_max_diff:.2e})")
    if report.causal_leak > atol:
        report.failures.append(f"causal mask leaks {report.causal_leak:.2e} of mass")


def validate(model: ModelLike, inputs: Any = None, *, atol: float = 1e-5, strict: bool = False) -> ValidationReport:
    """Run the fidelity checks on ``inputs`` (default: the adapter's sample input). ``strict`` raises CaptureError."""
    adapter = as_adapter(model)
    inputs = adapter.sample_inputs() if inputs is None else inputs
    prepared = adapter.prepare(inputs)
    report = ValidationReport(adapter=type(adapter).__name__)
    torch.manual_seed(0)
    base = adapter.run(prepared)
    torch.manual_seed(0)
    trace = capture(adapter, inputs, patterns=True)
    report.attention_path = str(trace.provenance.get("attention_path", ""))
    report.n_sites = len(trace.sites)
    if not report.n_sites:
        report.failures.append("capture recorded no sites")
    _compare_outputs(report, base, trace.output, atol)
    torch.manual_seed(0)
    reference = adapter.reference_patterns(prepared)
    _check_probs(report, trace, reference, adapter.causal_sites(), atol)
    if strict and not report.ok:
        raise CaptureError("capture fidelity check failed", expected="all checks pass", got=str(report))
    return report
