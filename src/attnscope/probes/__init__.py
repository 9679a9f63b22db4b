"""CAPTURE: model adapters, hooks, traces, streaming statistics, fidelity checks."""

from .validate import ValidationReport, validate

__all__ = ["ValidationReport", "validate"]
