"""Task metrics for prompt suites, evaluated in batches, additive over items (so batched sweeps equal loops).

What is scored per item (``eval_batches``):

- answer positions: with ``metadata["queries"]`` (associative recall) every query position predicts its answer;
  else with ``answer_ids`` / ``answer_text`` the answer is appended (teacher forcing) and the position before each
  answer token predicts it; else with ``metadata["repeat_span"] = [s, e)`` (induction) position ``t - 1``
  predicts ``ids[t]`` for ``s < t < e`` (``t - 1`` inside the repeat: its token occurred before);
- ``label`` (classification organisms) when the model returns ``[batch, classes]`` logits.

Metrics (``TaskMetric``): ``NextTokenAccuracy`` and ``AnswerLoss`` (mean cross-entropy) on the answer
positions, ``ClassificationAccuracy``, and ``EmbeddingCosine``: cosine similarity of mean-pooled sentence
embeddings (over non-padding tokens, as sentence-transformers pools MiniLM) to those of the unmodified model.
Each metric returns per-item ``(sum, count)`` statistics; the value is ``sum / count`` over the suite, so the
value of a suite does not depend on how it was batched. ``loss`` is the differentiable per-item loss that head
importance differentiates (cross-entropy; for embeddings an in-batch contrastive loss, see ``EmbeddingCosine``).

Example:
    >>> import torch, transformers
    >>> from attnscope.datasets import induction
    >>> from attnscope.circuits.task_metrics import eval_batches, NextTokenAccuracy, evaluate
    >>> cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=32, n_positions=32)
    >>> model = transformers.GPT2LMHeadModel(cfg).eval()
    >>> batches = eval_batches(induction(4, seq_len=16, vocab_size=32, seed=0), batch_size=2)
    >>> 0.0 <= evaluate(model, batches, NextTokenAccuracy()) <= 1.0
    True
"""

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from ..datasets.input_suite import InputSuite
from ..datasets.suite import PromptItem, PromptSuite
from ..errors import AnalysisError, InputError
from ..probes.adapter import ModelLike, module_of, tokenizer_of

IGNORE = -100


@dataclass
class EvalBatch:
    """``input_ids``/``attention_mask`` ``[batch, seq]`` (right-padded), ``targets`` ``[batch, seq]`` (the token
    each position should predict, ``-100`` where nothing is scored), ``labels`` ``[batch]`` (``-100``: none),
    ``indices`` ``[batch]`` (item index in the suite).

    A batch of an ``InputSuite`` (images, latents) has no token ids: ``input_ids`` and ``attention_mask`` are None,
    ``targets`` is ``[batch, 0]``, ``extra`` holds its forward tensors (batch first), ``shared`` those without a
    batch dimension, ``values`` its regression targets ``[batch, ...]`` (or None) and ``n_tokens`` the length of
    the sequence the model's attention sees."""

    input_ids: Tensor | None
    attention_mask: Tensor | None
    targets: Tensor
    labels: Tensor
    indices: Tensor
    extra: dict[str, Tensor] = field(default_factory=dict)
    shared: dict[str, Tensor] = field(default_factory=dict)
    values: Tensor | None = None
    n_tokens: int = 0

    @property
    def inputs(self) -> dict[str, Tensor]:
        if self.input_ids is None:
            return {**self.extra, **self.shared}
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    @property
    def seq_len(self) -> int:
        """Tokens per row: the padded width of the ids, else the attention sequence of the suite's inputs."""
        return int(self.input_ids.shape[1]) if self.input_ids is not None else int(self.n_tokens)

    @property
    def device(self) -> torch.device:
        return self.targets.device

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def _map(self, fn: Any) -> "EvalBatch":
        def each(t: Tensor | None) -> Tensor | None:
            return None if t is None else fn(t)
        return replace(self, input_ids=each(self.input_ids), attention_mask=each(self.attention_mask),
                       targets=fn(self.targets), labels=fn(self.labels), indices=fn(self.indices),
                       extra={k: fn(v) for k, v in self.extra.items()}, values=each(self.values))

    def replicate(self, n: int) -> "EvalBatch":
        """``n`` copies stacked along the batch (block ``i`` = rows ``[i*B, (i+1)*B)``); ``shared`` stays."""
        return self._map(lambda t: t.repeat(n, *([1] * (t.ndim - 1))))

    def to(self, device: Any) -> "EvalBatch":
        out = self._map(lambda t: t.to(device))
        out.shared = {k: v.to(device) for k, v in self.shared.items()}
        return out

    def keep_positions(self, keep: Tensor) -> "EvalBatch":
        """The batch scoring only positions ``keep`` (logits computed there only)."""
        return replace(self, targets=self.targets[:, keep])


def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    if tokenizer is None:
        raise InputError("text items need a tokenizer", expected="a model loaded with a tokenizer", got=None,
                         fix="load the model with attnscope.load(...) or use a token-id suite")
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def item_sequence(item: PromptItem, tokenizer: Any = None) -> tuple[list[int], list[tuple[int, int]]]:
    """The ids to run and the scored ``(position, target)`` pairs of one item."""
    ids = list(item.ids) if item.ids is not None else _encode(tokenizer, item.text, True)
    queries = item.metadata.get("queries")
    if queries and all("position" in q and "answer" in q for q in queries):
        return ids, [(int(q["position"]), int(q["answer"])) for q in queries if int(q["position"]) < len(ids)]
    answer = item.answer_ids
    if answer is None and item.answer_text is not None:
        answer = _encode(tokenizer, item.answer_text, False)
    if answer:
        scored = [(len(ids) - 1 + j, int(t)) for j, t in enumerate(answer)]
        return ids + [int(t) for t in answer[:-1]], scored
    span = item.metadata.get("repeat_span")
    if span:  # position t - 1 >= start has an earlier occurrence: it predicts ids[t] by induction
        start, end = int(span[0]), min(int(span[1]), len(ids))
        return ids, [(t - 1, ids[t]) for t in range(max(start + 1, 1), end)]
    return ids, []


def _pad_id(suite: PromptSuite, tokenizer: Any, pad_id: int | None) -> int:
    if pad_id is not None:
        return int(pad_id)
    if tokenizer is not None and getattr(tokenizer, "pad_token_id", None) is not None:
        return int(tokenizer.pad_token_id)
    return int(suite.params.get("pad_id") or suite.metadata.get("pad_id") or 0)


def input_batches(suite: InputSuite, batch_size: int = 16) -> list[EvalBatch]:
    """``EvalBatch`` es of an ``InputSuite`` (images, latents): forward tensors, labels, regression targets."""
    out = []
    for batch in suite.batches(batch_size):
        n = len(batch.indices)
        extra = {k: v for k, v in batch.inputs.items() if k not in suite.shared}
        out.append(EvalBatch(None, None, torch.full((n, 0), IGNORE, dtype=torch.long), batch.labels,
                             torch.tensor(batch.indices), extra, dict(suite.shared), batch.targets, suite.n_tokens))
    return out


def eval_batches(suite: "PromptSuite | InputSuite", tokenizer: Any = None, batch_size: int = 16,
                 pad_id: int | None = None) -> list[EvalBatch]:
    """Right-padded ``EvalBatch`` es of the suite (see the module docstring for what is scored)."""
    if isinstance(suite, InputSuite):
        return input_batches(suite, batch_size)
    if len(suite) == 0:
        raise InputError("empty suite", expected="at least one item", got=0)
    pad = _pad_id(suite, tokenizer, pad_id)
    out = []
    for start in range(0, len(suite), int(batch_size)):
        chunk = suite.items[start:start + int(batch_size)]
        seqs = [item_sequence(item, tokenizer) for item in chunk]
        width = max(len(ids) for ids, _ in seqs)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        targets = torch.full_like(ids, IGNORE)
        for row, (seq, scored) in enumerate(seqs):
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
            for pos, tok in scored:
                targets[row, pos] = tok
        labels = torch.tensor([it.label if isinstance(it.label, int) and not isinstance(it.label, bool) else IGNORE
                               for it in chunk], dtype=torch.long)
        out.append(EvalBatch(ids, mask, targets, labels, torch.arange(start, start + len(chunk))))
    return out


def reference_ids(batches: Sequence[EvalBatch]) -> "list[list[int]] | list[dict[str, Tensor]]":
    """The reference inputs of mean / resample ablation: the unpadded token ids of every item, or (batches of an
    ``InputSuite``) each batch's forward tensors."""
    if batches and batches[0].input_ids is None:
        return [dict(b.inputs) for b in batches]
    return [row[m.bool()].tolist() for b in batches for row, m in zip(b.input_ids, b.attention_mask)]


# ---- metrics ------------------------------------------------------------------------------------------------------

def _output(output: Any, name: str, expected: str, fix: str) -> Tensor:
    """``output`` itself (a tensor), its ``name`` field, or its first element; AnalysisError when there is none."""
    if torch.is_tensor(output):
        return output
    value = getattr(output, name, None)
    if value is None and isinstance(output, (tuple, list)):
        value = output[0]
    if value is None:
        raise AnalysisError(f"the model returned no {name}", expected=expected, got=type(output).__name__, fix=fix)
    return value


def _logits(output: Any) -> Tensor:
    return _output(output, "logits", "a model with an LM or classification head",
                   "use the embedding metric for encoders without a head")


def _upcast(x: Tensor) -> Tensor:
    """At least float32 (float64 stays float64, for finite-difference checks)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class TaskMetric:
    """Per-item ``(sum, count)`` statistics, their reduction, and a differentiable per-item loss."""

    name = "metric"
    higher_is_better = True

    def item_stats(self, output: Any, batch: EvalBatch) -> Tensor:  # [batch, 2]
        raise NotImplementedError

    def loss(self, output: Any, batch: EvalBatch) -> Tensor:  # [batch]
        raise NotImplementedError

    def reduce(self, totals: Tensor) -> float:
        return float(totals[0] / totals[1]) if float(totals[1]) > 0 else float("nan")

    def token_loss(self, output: Any, batch: EvalBatch) -> Tensor:
        """Per-position loss ``[batch, seq]`` (0 where nothing is scored), for per-token importance."""
        logits = _logits(output)
        if logits.ndim != 3:
            raise AnalysisError("per-token loss needs token logits", expected="[batch, seq, vocab]",
                                got=list(logits.shape), fix="use variant='abs_per_example'")
        ce = F.cross_entropy(_upcast(logits).transpose(1, 2), batch.targets, ignore_index=IGNORE, reduction="none")
        count = (batch.targets != IGNORE).sum(1, keepdim=True).clamp_min(1)
        return ce / count


class _TokenMetric(TaskMetric):
    def _check(self, batch: EvalBatch) -> Tensor:
        valid = batch.targets != IGNORE
        if not bool(valid.any()):
            raise AnalysisError("no scored positions in the batch", expected="items with answers or a repeat span",
                                got="none", fix="use a suite with answers, or the embedding metric")
        return valid

    def loss(self, output: Any, batch: EvalBatch) -> Tensor:
        return self.token_loss(output, batch).sum(1)


class NextTokenAccuracy(_TokenMetric):
    """Fraction of answer positions whose argmax prediction is the answer token."""

    name = "next_token_accuracy"

    def item_stats(self, output: Any, batch: EvalBatch) -> Tensor:
        valid = self._check(batch)
        correct = (_logits(output).argmax(-1) == batch.targets) & valid
        return torch.stack([correct.sum(1), valid.sum(1)], 1).double()


class AnswerLoss(_TokenMetric):
    """Mean cross-entropy (nats) over answer positions (lower is better)."""

    name = "answer_loss"
    higher_is_better = False

    def item_stats(self, output: Any, batch: EvalBatch) -> Tensor:
        valid = self._check(batch)
        logits = _logits(output).double()
        ce = F.cross_entropy(logits.transpose(1, 2), batch.targets, ignore_index=IGNORE, reduction="none")
        return torch.stack([(ce * valid).sum(1), valid.sum(1).double()], 1)


class ClassificationAccuracy(TaskMetric):
    """Accuracy of ``[batch, classes]`` logits against the items' labels."""

    name = "classification_accuracy"

    def item_stats(self, output: Any, batch: EvalBatch) -> Tensor:
        valid = batch.labels != IGNORE
        correct = (_logits(output).argmax(-1) == batch.labels) & valid
        return torch.stack([correct, valid], 1).double()

    def loss(self, output: Any, batch: EvalBatch) -> Tensor:
        return F.cross_entropy(_upcast(_logits(output)), batch.labels, ignore_index=IGNORE, reduction="none")


def mean_pool(output: Any, attention_mask: Int[Tensor, "batch seq"] | None) -> Float[Tensor, "batch hidden"]:
    """Mean of the last hidden state over non-padding tokens ``[batch, hidden]`` (sentence-transformers pooling;
    every token when ``attention_mask`` is None: image patches)."""
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None:
        hidden = output[0] if isinstance(output, (tuple, list)) else None
    if hidden is None or hidden.ndim != 3:
        raise AnalysisError("no token embeddings to pool", expected="last_hidden_state [batch, seq, hidden]",
                            got=type(output).__name__, fix="use an encoder (BERT class) for the embedding metric")
    if attention_mask is None:
        return hidden.mean(1)
    weights = attention_mask[..., None].to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)


class EmbeddingCosine(TaskMetric):
    """Cosine similarity of each sentence's mean-pooled embedding to the unmodified model's (1.0 when unchanged).

    ``reference``: ``[n_items, hidden]`` embeddings of the unmodified model, indexed by suite item. The importance
    loss is an in-batch contrastive loss (our choice; the cosine itself is at its maximum, with zero gradient, at
    the unmodified model): ``-log softmax_j(cos(e_i, ref_j) / temperature)[i]``.
    """

    name = "embedding_cosine"

    def __init__(self, reference: Tensor, temperature: float = 0.05):
        self.reference = reference.detach().double()
        self.temperature = float(temperature)

    def item_stats(self, output: Any, batch: EvalBatch) -> Tensor:
        emb = mean_pool(output, batch.attention_mask).double()
        ref = self.reference.to(emb.device)[batch.indices]
        cos = F.cosine_similarity(emb, ref, dim=-1)
        return torch.stack([cos, torch.ones_like(cos)], 1)

    def loss(self, output: Any, batch: EvalBatch) -> Tensor:
        emb = F.normalize(_upcast(mean_pool(output, batch.attention_mask)), dim=-1)
        ref = F.normalize(self.reference.to(device=emb.device, dtype=emb.dtype), dim=-1)
        logits = emb @ ref.T / self.temperature  # [batch, n_items]
        return F.cross_entropy(logits, batch.indices.to(emb.device), reduction="none")


def _prediction(output: Any) -> Tensor:
    return _output(output, "sample", "a denoiser output (.sample)", "use the denoising loss with a diffusion denoiser")


class DenoisingLoss(TaskMetric):
    """Mean squared error of a denoiser's prediction against the items' targets (the velocity ``noise - x0`` of
    ``attnscope.datasets.latent_suite``), per element, averaged per item (lower is better)."""

    name = "denoising_loss"
    higher_is_better = False

    def _item_mse(self, output: Any, batch: EvalBatch, dtype: torch.dtype) -> Tensor:
        if batch.values is None:
            raise AnalysisError("no regression targets in the batch", expected="an input suite with targets "
                                "(latents)", got="none", fix="build the suite with attnscope.datasets.latent_suite")
        error = (_prediction(output).to(dtype) - batch.values.to(dtype)) ** 2
        return error.flatten(1).mean(1)

    def item_stats(self, output: Any, batch: EvalBatch) -> Tensor:
        mse = self._item_mse(output, batch, torch.float64)
        return torch.stack([mse, torch.ones_like(mse)], 1)

    def loss(self, output: Any, batch: EvalBatch) -> Tensor:
        return self._item_mse(output, batch, torch.promote_types(_prediction(output).dtype, torch.float32))


# ---- evaluation ---------------------------------------------------------------------------------------------------

def decoder_reads_input(module: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with ``decoder_input_ids = input_ids`` (and its mask) for an encoder-decoder model: its decoder
    then reads the same tokens, so the logits at position ``t`` predict token ``t + 1`` as a causal LM's do (the
    suites' targets). Without them BART-class models shift the ids right themselves (the logits at ``t`` would
    predict token ``t``: every target one position off) and T5 refuses to run."""
    config = getattr(module, "config", None)
    if not getattr(config, "is_encoder_decoder", False) or "input_ids" not in kwargs or "decoder_input_ids" in kwargs:
        return kwargs
    out = dict(kwargs, decoder_input_ids=kwargs["input_ids"])
    if kwargs.get("attention_mask") is not None:
        out["decoder_attention_mask"] = kwargs["attention_mask"]
    return out


def forward(model: nn.Module, batch: EvalBatch) -> Any:
    model = module_of(model)
    device = next(model.parameters()).device
    return model(**decoder_reads_input(model, batch.to(device).inputs))


@torch.no_grad()
def metric_totals(model: nn.Module, batches: Sequence[EvalBatch], metric: TaskMetric) -> Tensor:
    """Summed ``(sum, count)`` statistics of ``metric`` over the batches."""
    totals = torch.zeros(2, dtype=torch.float64)
    for batch in batches:
        device = next(module_of(model).parameters()).device
        totals += metric.item_stats(forward(model, batch), batch.to(device)).sum(0).cpu()
    return totals


def evaluate(model: nn.Module, batches: Sequence[EvalBatch], metric: TaskMetric) -> float:
    """The metric's value over the batches (in the model's current state, e.g. inside ``apply_plan``)."""
    return metric.reduce(metric_totals(model, batches, metric))


@torch.no_grad()
def sentence_embeddings(model: nn.Module, batches: Sequence[EvalBatch]) -> Tensor:
    """Mean-pooled embeddings ``[n_items, hidden]`` in suite order."""
    rows: dict[int, Tensor] = {}
    for batch in batches:
        mask = batch.attention_mask
        emb = mean_pool(forward(model, batch), None if mask is None else mask.to(
            next(module_of(model).parameters()).device))
        rows.update({int(i): e.cpu() for i, e in zip(batch.indices, emb)})
    return torch.stack([rows[i] for i in sorted(rows)])


METRICS = ("accuracy", "loss", "embedding_cosine", "classification_accuracy", "denoising_loss")


@torch.no_grad()
def default_metric(model: nn.Module, batches: Sequence[EvalBatch], name: str | None = None) -> TaskMetric:
    """The suite's metric: ``accuracy`` (next token) / ``loss`` for LMs with scored positions,
    ``classification_accuracy`` for ``[batch, classes]`` logits, ``embedding_cosine`` otherwise."""
    if name is not None and name not in METRICS:
        raise InputError("unknown metric", expected=", ".join(METRICS), got=name)
    if name == "embedding_cosine":
        return EmbeddingCosine(sentence_embeddings(model, batches))
    if name == "denoising_loss" or (name == "loss" and batches[0].values is not None):
        return DenoisingLoss()
    if name == "loss" and batches[0].input_ids is None:
        raise InputError("no loss for this input suite", expected="a suite with targets (latents) or the metric "
                         "classification_accuracy / embedding_cosine", got=name,
                         fix="pass metric=classification_accuracy (a classifier) or embedding_cosine")
    if name == "loss":
        return AnswerLoss()
    if name in ("accuracy", "classification_accuracy"):
        return NextTokenAccuracy() if name == "accuracy" else ClassificationAccuracy()
    if batches[0].values is not None:
        return DenoisingLoss()
    output = forward(model, batches[0])
    logits = getattr(output, "logits", None)
    if logits is not None and logits.ndim == 3 and any(bool((b.targets != IGNORE).any()) for b in batches):
        return NextTokenAccuracy()
    if logits is not None and logits.ndim == 2 and any(bool((b.labels != IGNORE).any()) for b in batches):
        return ClassificationAccuracy()
    if getattr(output, "last_hidden_state", None) is not None:
        return EmbeddingCosine(sentence_embeddings(model, batches))
    raise AnalysisError("no metric fits this model and suite", expected="answers for an LM, labels for a "
                        "classifier, or an encoder", got=type(output).__name__, fix="pass metric=...")


def takes_token_ids(model: ModelLike) -> bool:
    """Whether ``model`` reads token ids: its ``main_input_name`` is ``input_ids``, or (without one) its forward
    names ``input_ids`` / ``input`` or takes ``*args`` / ``**kwargs``. Vision encoders (``pixel_values``), speech
    models and diffusers denoisers / pipelines do not."""
    module = module_of(model)
    name = getattr(module, "main_input_name", None)
    if isinstance(name, str):
        return name == "input_ids"
    forward = getattr(module, "forward", None)
    if forward is None:
        return False
    params = inspect.signature(forward).parameters.values()
    return any(p.name in ("input_ids", "input") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)


def require_token_model(model: ModelLike, analysis: str) -> None:
    """Refuse a token-id prompt suite for a model that does not read token ids (``InputError``, before any run)."""
    if takes_token_ids(model):
        return
    module = module_of(model)
    reads = getattr(module, "main_input_name", None) or "no input_ids"
    raise InputError(f"{analysis} scores token prompt suites, which this model cannot read",
                     expected="a model fed token ids (text models, encoder-decoders, VLMs)",
                     got=f"{type(module).__name__} takes {reads}",
                     fix="score a vision encoder on the images suite and a Flux / SD3 denoiser on the latents "
                     "suite (--suite images / --suite latents; attnscope.datasets.image_suite / latent_suite)")


def require_suite_fits(model: ModelLike, suite: Any, analysis: str) -> None:
    """``InputError`` (before any run) unless ``suite`` can feed ``model``: a token suite needs a model that reads
    token ids, an ``InputSuite`` (images, latents) the model class it was built for."""
    if not isinstance(suite, InputSuite):
        require_token_model(model, analysis)
        return
    module = module_of(model)
    if suite.model_class and type(module).__name__ != suite.model_class:
        raise InputError(f"{analysis}: the {suite.kind} suite was built for another model",
                         expected=suite.model_class, got=type(module).__name__,
                         fix=f"build it for this model: attnscope.tasks.suites.build_suite({suite.kind!r}, model)")


def metric_for(model: ModelLike, suite: "PromptSuite | InputSuite", metric: str | None = None, batch_size: int = 16
               ) -> tuple[list[EvalBatch], TaskMetric]:
    """Batches of ``suite`` for ``model`` (a ``model handle (``attnscope.load``)`` or module) and its task metric."""
    require_suite_fits(model, suite, "a task metric")
    batches = eval_batches(suite, tokenizer_of(model), batch_size)
    return batches, default_metric(model, batches, metric)


__all__ = ["AnswerLoss", "ClassificationAccuracy", "DenoisingLoss", "EmbeddingCosine", "EvalBatch",
           "NextTokenAccuracy", "TaskMetric", "decoder_reads_input", "default_metric", "eval_batches", "evaluate",
           "input_batches", "item_sequence", "mean_pool", "metric_for", "metric_totals", "reference_ids",
           "require_suite_fits", "require_token_model", "sentence_embeddings",
           "takes_token_ids"]
