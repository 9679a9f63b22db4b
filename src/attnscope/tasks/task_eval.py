"""The model, suite and task metric that ``attnscope ablate`` and ``attnscope prune`` evaluate.

``EvalSpec`` names them (the suite defaults to a zoo organism's own task, else ``sentences``);
``prepare_evaluation`` loads the model, builds the suite fitted to it, batches it and picks the metric;
``reference_inputs`` draws the suite again (the reference inputs of mean / resample ablation).

Example:
    >>> from attnscope.tasks.references import ModelRef
    >>> from attnscope.tasks.task_eval import EvalSpec, prepare_evaluation
    >>> spec = EvalSpec(ModelRef.parse("zoo:induction-2l"), n_items=4)
    >>> spec.suite_ref().name
    'default'
    >>> evaluation = prepare_evaluation(spec)
    >>> evaluation.suite.generator, len(evaluation.suite), len(evaluation.batches), evaluation.metric.name
    ('induction', 4, 1, 'next_token_accuracy')
"""

from dataclasses import dataclass, field
from typing import Any

from ..circuits.task_metrics import EvalBatch, TaskMetric, eval_batches, metric_for, reference_ids
from ..datasets.suite import PromptSuite
from ..probes.adapter import ModelAdapter
from .models import load_ref
from .references import ModelRef, SuiteRef
from .suites import build_suite


@dataclass(frozen=True)
class EvalSpec:
    """A model, a suite (None: ``default``: the organism's own task for ``zoo:NAME``, ``images`` / ``latents`` for a
    vision encoder / denoiser, else ``sentences``) with ``n_items``,
    ``seed`` (None: a zoo card's held-out seed, or 0) and generator arguments, a metric (None: picked from the
    model and suite) and the batch size."""

    model: ModelRef
    suite: SuiteRef | None = None
    n_items: int = 64
    seed: int | None = None
    suite_args: dict[str, Any] = field(default_factory=dict)
    metric: str | None = None
    batch_size: int = 16

    def suite_ref(self) -> SuiteRef:
        """The suite named, or the default one for the model."""
        return self.suite or SuiteRef("default")  # build_suite: the organism's task, images, latents or sentences


@dataclass
class Evaluation:
    """A loaded model, its suite, the suite's batches and the task metric evaluated on them."""

    model: ModelAdapter
    suite: PromptSuite
    batches: list[EvalBatch]
    metric: TaskMetric


def prepare_evaluation(spec: EvalSpec) -> Evaluation:
    """Load the model, build the suite for it, batch it and pick the metric."""
    model = load_ref(spec.model)
    suite = build_suite(spec.suite_ref(), model, n_items=spec.n_items, seed=spec.seed, **spec.suite_args)
    batches, metric = metric_for(model, suite, spec.metric, spec.batch_size)
    return Evaluation(model, suite, batches, metric)


def reference_inputs(spec: EvalSpec, evaluation: Evaluation, seed: int | None = None) -> list[Any]:
    """The inputs mean / resample ablation draw from: the suite drawn again with ``seed`` (default: the suite's
    seed + 1), or a suite file itself; token ids unpadded, as evaluated (images / latents: forward tensors)."""
    suite = evaluation.suite
    if not spec.suite_ref().path:
        seed = seed if seed is not None else (suite.seed or 0) + 1
        suite = build_suite(spec.suite_ref(), evaluation.model, n_items=spec.n_items, seed=seed, **spec.suite_args)
    return reference_ids(eval_batches(suite, evaluation.model.tokenizer, spec.batch_size))
