"""attnscope.tasks: run analyses by name. Resolves model references (``zoo:NAME`` included), prompt suites and
analyses, binds options, runs an analysis on a model and a suite, and writes its table; each other CLI command's
work is a job here (a request dataclass and one ``run_*`` function: capture, remote-capture, ablate, prune,
attribute, heatmap, patch). The CLI, sweeps and the dashboard call it; nothing below it parses names. Exports
are imported on first use (the CLI stays quick).

Example:
    >>> from attnscope import tasks
    >>> tasks.ModelRef.parse("zoo:sink-lm").kind, tasks.SuiteRef.parse("induction").name
    ('zoo', 'induction')
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "references": ("ModelRef", "SUITE_NAMES", "SuiteRef"),
    "models": ("clear_model_cache", "load_model", "load_ref"),
    "suites": ("PromptList", "build_suite", "check_suite_ids", "check_suite_params", "shapes_suite"),
    "analyses": ("bind_options", "get_analysis", "list_analyses", "run_analysis"),
    "scoring": ("ScoreRequest", "score"),
    "summary": ("summary_text",),
    "demo": ("DEMO_SENTENCES", "run_demo"),
    "capture_job": ("CaptureJob", "run_capture_job"),
    "remote_capture_job": ("RemoteCaptureJob", "run_remote_capture_job"),
    "task_eval": ("EvalSpec", "Evaluation", "prepare_evaluation"),
    "ablation_job": ("AblationRequest", "AblationResult", "run_ablation_job"),
    "pruning_job": ("PruneRequest", "PruneResult", "run_prune_job"),
    "attribution_job": ("AttributionRequest", "AttributionResult", "run_attribution_job"),
    "heatmap_job": ("HeatmapRequest", "HeatmapResult", "run_heatmap_job"),
    "patch_job": ("PatchRequest", "PatchResult", "load_pairs", "run_patch_job"),
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, None)
