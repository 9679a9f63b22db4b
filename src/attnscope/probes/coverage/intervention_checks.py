"""``apply_plan`` against the reference edits of ``reference_edits``, one column per intervention mode.

``mean``: text models get the means in the plan (``mean_values``); every other kind gives ``reference_inputs``
(``inputs_for(seed=1)``) and attnscope computes the means (over unpadded text positions, every other position).

``resample``: text models draw from one token-id reference (the draw is trivial); every other kind (vision,
speech, VLMs, diffusion denoisers) takes a second seeded batch of its own inputs (``inputs_for(seed=7)``) as
``reference_inputs``, and the reference edit states the documented draw itself: row ``b`` takes reference row
``numpy.random.default_rng([0, b])`` picks among the reference rows at least as long as the row (token lengths
from the attention masks), each of which differs from the row (the redrawn images / features / latents). A layer
that packs every image into one attention row (Qwen2-VL's vision tower) takes the drawn images' segments.
"""

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..head_slices import output_projections
from ..heads import Head, HeadSet
from ..interventions import InterventionPlan, apply_plan, resample_plan
from .catalogue import ARCHITECTURES, inputs_for, token_batch
from .checks import Subject
from .outcome import fail, magnitude, max_diff, tensors
from .reference_edits import (ATOL, RTOL, SCALE, VISIBLE, Edit, add_edit, per_call, record_edit, replace_edit,
                              run_reference, scale_edit, uniform_edit, zero_edit)


class Targets:
    """The heads every intervention column edits and the attention modules that compute them."""

    def __init__(self, subject: Subject):
        self.projections = output_projections(subject.model)
        last = len(self.projections) - 1
        pairs = {(0, 0), (last, self.projections[last].n_heads - 1)}
        self.pairs = sorted(pairs)
        # (id(attention module), application) -> heads; application: which call of a module shared by several
        # layers (ALBERT) the layer is, None for a module of its own
        self.modules: dict[tuple[int, int | None], list[int]] = {}
        self.layer_of: dict[tuple[int, int | None], int] = {}
        for layer, head in self.pairs:
            proj = self.projections[layer]
            key = (id(proj.attention), proj.application)
            self.modules.setdefault(key, []).append(head)
            self.layer_of[key] = layer

    def heads(self) -> Any:
        return HeadSet(self.pairs)

    def edits(self, make) -> dict[int, Edit]:
        """id(module) -> the reference edit (``make(key, heads)``; per call of a shared module)."""
        grouped: dict[int, dict[int | None, Edit]] = {}
        for key, heads in self.modules.items():
            grouped.setdefault(key[0], {})[key[1]] = make(key, heads)
        return {mid: by_call[None] if None in by_call else per_call(by_call) for mid, by_call in grouped.items()}


def _targets(subject: Subject) -> Targets:
    return subject.memo("targets", lambda: Targets(subject))


def _clean(subject: Subject) -> tuple[list[torch.Tensor], dict[int, int]]:
    """Outputs of the reference function without edits, and how often each attention module called it."""
    def compute() -> tuple[list[torch.Tensor], dict[int, int]]:
        output, calls = run_reference(subject.model, subject.inputs, {})
        return tensors(output), calls
    return subject.memo("clean", compute)


def _recorded(subject: Subject, inputs: dict[str, Any], key: str) -> dict[int, dict[int, torch.Tensor]]:
    """id(module) -> head -> ``[batch, query, d]`` head outputs of ``inputs``, recorded by the reference function."""
    def compute() -> dict[int, dict[int, torch.Tensor]]:
        targets = _targets(subject)
        stores: dict[int, dict[int, torch.Tensor]] = {mid: {} for mid in targets.modules}
        run_reference(subject.model, inputs, targets.edits(lambda mid, heads: record_edit(heads, stores[mid])))
        return stores
    return subject.memo(key, compute)


def _mean_inputs(subject: Subject) -> dict[str, Any]:
    return inputs_for(subject.name, subject.model, seed=1)


def _resample_ids(subject: Subject) -> list[int]:
    ids = subject.inputs.get("input_ids")
    length = int(ids.shape[1]) if torch.is_tensor(ids) else 10
    return token_batch(seed=7, length=length, pad=0)["input_ids"][0].tolist()


TEXT_KINDS = ("text-decoder", "text-encoder", "encoder-decoder")
SOURCE_SEED = 7


def _token_resample(subject: Subject) -> bool:
    return ARCHITECTURES[subject.name].kind in TEXT_KINDS


def _source(subject: Subject) -> dict[str, torch.Tensor]:
    """The resample reference input as forward kwargs (text: how ``apply_plan`` runs it, ids and a mask of ones;
    any other kind: a second seeded batch of the model's own inputs)."""
    if not _token_resample(subject):
        return subject.memo("source", lambda: inputs_for(subject.name, subject.model, seed=SOURCE_SEED))
    ids = _resample_ids(subject)
    source = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    config = subject.model.config
    if getattr(config, "is_encoder_decoder", False):  # teacher forcing: the ids shifted right (HF's shift_right)
        start = getattr(config, "decoder_start_token_id", None)
        start = start if start is not None else getattr(config, "pad_token_id", 0)
        source["decoder_input_ids"] = torch.tensor([[int(start)] + ids[:-1]])
    return source


def _plan_and_reference(subject: Subject, mode: str) -> tuple[Any, Callable[[], dict[int, Edit]]]:
    """The plan of ``mode`` and a thunk making its reference edits (run after ``apply_plan``, so that a refusal
    by attnscope is reported before any reference failure)."""
    targets = _targets(subject)
    heads = targets.heads()
    if mode == "zero":
        return InterventionPlan(heads, "zero"), lambda: targets.edits(lambda mid, hs: zero_edit(hs))
    if mode == "rescale":
        return InterventionPlan(heads, "rescale", scale=SCALE), \
            lambda: targets.edits(lambda mid, hs: scale_edit(hs, SCALE))
    if mode == "uniform":
        return InterventionPlan(heads, "uniform"), lambda: targets.edits(lambda mid, hs: uniform_edit(hs))
    if mode == "steer":  # a fixed, seeded vector per head
        gen = torch.Generator().manual_seed(3)
        vectors = {mid: {h: torch.randn(targets.projections[targets.layer_of[mid]].d_head, generator=gen)
                         for h in hs} for mid, hs in targets.modules.items()}
        values = {Head(targets.layer_of[mid], h): v.tolist() for mid, hv in vectors.items() for h, v in hv.items()}
        return InterventionPlan(heads, "steer", vectors=values), \
            lambda: targets.edits(lambda mid, hs: add_edit(vectors[mid]))
    if mode == "mean":
        try:
            recorded = _recorded(subject, _mean_inputs(subject), "mean-source")
        except Exception as error:  # noqa: BLE001 - the check itself could not be carried out
            raise fail(f"reference could not record the mean ({type(error).__name__}: {error})") from error
        if not _token_resample(subject):  # any modality: attnscope computes the means from the reference inputs
            mask = _mean_inputs(subject).get("attention_mask")
            means = {mid: {h: _masked_mean(out, mask) for h, out in heads_out.items()}
                     for mid, heads_out in recorded.items()}
            plan = InterventionPlan(heads, "mean", reference_inputs=_mean_inputs(subject))
            return plan, lambda: targets.edits(lambda mid, hs: replace_edit(means[mid]))
        means = {mid: {h: out.double().mean((0, 1)).float() for h, out in heads_out.items()}
                 for mid, heads_out in recorded.items()}
        values = {Head(targets.layer_of[mid], h): v.tolist() for mid, hv in means.items() for h, v in hv.items()}
        plan = InterventionPlan(heads, "mean", mean_values=values)
        return plan, lambda: targets.edits(lambda mid, hs: replace_edit(means[mid]))
    if not _token_resample(subject):
        return resample_plan(heads, _source(subject), seed=0), lambda: _drawn_edits(subject)
    plan = resample_plan(heads, [_resample_ids(subject)], seed=0)

    def resample_edits() -> dict[int, Edit]:
        recorded = _recorded(subject, _source(subject), "resample-source")
        return targets.edits(lambda mid, hs: replace_edit(recorded[mid]))
    return plan, resample_edits


def _masked_mean(out: torch.Tensor, mask: Any) -> torch.Tensor:
    """Mean of ``out [rows, positions, d]`` over its positions; over the unpadded ones where the reference's
    attention mask is as wide as the layer (text positions)."""
    if torch.is_tensor(mask) and mask.shape == out.shape[:2]:
        keep = mask.to(torch.float64)[..., None].to(out.device)
        return ((out.double() * keep).sum((0, 1)) / keep.sum()).float()
    return out.double().mean((0, 1)).float()


def _lengths(inputs: dict[str, Any]) -> list[int] | None:
    mask = inputs.get("attention_mask")
    return [int(n) for n in mask.sum(1).tolist()] if torch.is_tensor(mask) and mask.ndim == 2 else None


def _drawn_rows(subject: Subject, source: dict[str, Any], n_ref: int, batch: int) -> list[int]:
    """The documented draw, stated here: row b picks ``default_rng([0, b]).integers`` among the reference rows
    at least as long as it (else the longest); none is identical to an input row (their floats were redrawn)."""
    own, ref = _lengths(subject.inputs), _lengths(source)
    rows = []
    for b in range(batch):
        ok = list(range(n_ref)) if own is None or ref is None else [r for r in range(n_ref) if ref[r] >= own[b]]
        ok = ok or [r for r in range(n_ref) if ref[r] == max(ref)]
        rows.append(ok[int(np.random.default_rng([0, b]).integers(len(ok)))])
    return rows


def _drawn_edits(subject: Subject) -> dict[int, Edit]:
    """Each input row's head outputs replaced by its drawn reference row's (recorded on the reference inputs);
    on text-aligned layers (as wide as the reference's attention mask) padded reference positions give that
    row's mean over its unpadded positions."""
    source = _source(subject)
    recorded = _recorded(subject, source, "resample-source")
    mask = source.get("attention_mask")
    values: dict[int, dict[int, torch.Tensor]] = {}
    rows = int(_clean(subject)[0][0].shape[0])
    for mid, heads_out in recorded.items():
        values[mid] = {}
        for head, out in heads_out.items():  # [n_ref, query, d]
            if out.shape[0] == 1 and rows > 1:  # every image packed into one attention row (Qwen2-VL's vision)
                segments = out.reshape(rows, out.shape[1] // rows, *out.shape[2:])
                values[mid][head] = segments[_drawn_rows(subject, source, rows, rows)].reshape(1, -1, *out.shape[2:])
                continue
            if torch.is_tensor(mask) and mask.shape == out.shape[:2]:
                keep = mask.bool()[..., None].to(out.device)
                mean = (out.double() * keep).sum(1) / keep.sum(1).clamp_min(1)
                out = torch.where(keep, out, mean[:, None].to(out.dtype))
            values[mid][head] = out[_drawn_index(subject, source, out.shape[0])]
    return _targets(subject).edits(lambda mid, hs: replace_edit(values[mid]))


def _drawn_index(subject: Subject, source: dict[str, Any], n_attention: int) -> list[int]:
    """Attention-batch rows of the drawn reference rows. The input and reference batches have as many rows as
    the model's output; attention that folds windows into the batch (Swin) holds row b's windows at
    ``b * windows + w``."""
    rows = int(_clean(subject)[0][0].shape[0])
    fold = n_attention // rows
    return [r * fold + w for r in _drawn_rows(subject, source, rows, rows) for w in range(fold)]


def _close(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise agreement within atol 1e-5 x the tensor's scale (max |b|, at least 1) plus rtol 1e-5."""
    scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
    return torch.isclose(a.double(), b.double(), atol=ATOL * scale, rtol=RTOL, equal_nan=True)


def _kernel_agreement(subject: Subject, inputs: dict[str, Any], key: str) -> list[torch.Tensor]:
    """Per output element: do the model's own kernel and the eager reference function (no edits) agree? Where
    they do not (rows with every key masked, models whose kernels differ) an edit cannot be checked."""
    def compute() -> list[torch.Tensor]:
        with torch.no_grad():
            own = tensors(subject.model(**inputs))
        ref = _clean(subject)[0] if inputs is subject.inputs else tensors(run_reference(subject.model, inputs, {})[0])
        max_diff(own, ref)  # same structure
        return [_close(a, b) for a, b in zip(own, ref)]
    return subject.memo(key, compute)


def _agreement_fraction(masks: list[torch.Tensor]) -> float:
    total = sum(m.numel() for m in masks)
    return sum(int(m.sum()) for m in masks) / total if total else 1.0


def _probe(subject: Subject) -> None:
    """The reference function must see every target module, or no reference edit can be made."""
    targets = _targets(subject)
    try:
        _, calls = _clean(subject)
    except Exception as error:  # noqa: BLE001 - the check itself could not be carried out
        raise fail(f"reference could not run ({type(error).__name__}: {error})") from error
    silent = sorted(targets.layer_of[key] for key in targets.modules if not calls.get(key[0]))
    if silent:
        raise fail(f"cannot verify: layer(s) {silent} never call the attention function (transformers) or SDPA "
                   "(diffusers) that the reference edits through")


def check_mode(subject: Subject, mode: str) -> None:
    """``apply_plan`` of ``mode`` (on the model's own attention kernel) gives the outputs of the reference edit
    (on the eager reference function), compared wherever the two kernels agree without edits."""
    _targets(subject)
    _probe(subject)
    plan, reference_edits = _plan_and_reference(subject, mode)
    with apply_plan(subject.model, plan), torch.no_grad():
        got = tensors(subject.model(**subject.inputs))
    try:
        want = tensors(run_reference(subject.model, subject.inputs, reference_edits())[0])
        agree = _kernel_agreement(subject, subject.inputs, "agree")
        source_agree = _kernel_agreement(subject, _source(subject), "agree-source") if mode == "resample" else []
    except Exception as error:  # noqa: BLE001 - the check itself could not be carried out
        raise fail(f"reference edit could not run ({type(error).__name__}: {error})") from error
    share = _agreement_fraction(agree)
    if share < 0.5:
        raise fail(f"inconclusive: the model's kernel and eager attention disagree on {1 - share:.0%} of outputs")
    if _agreement_fraction(source_agree) < 1.0:
        raise fail("inconclusive: the model's kernel and eager attention disagree on the resample reference input")
    diff = max_diff(got, want)
    visible = max_diff(want, _clean(subject)[0])
    bad = [~_close(a, b) & keep for a, b, keep in zip(got, want, agree)]
    if any(bool(m.any()) for m in bad):
        worst = max(float((a.double() - b.double()).abs()[m].max()) for a, b, m in zip(got, want, bad) if m.any())
        raise fail(f"outputs differ from the reference edit by {magnitude(worst)} "
                   f"(the edit itself moves them by {magnitude(visible)})")
    if visible < VISIBLE:
        raise fail(f"inconclusive: the reference edit moves the outputs by only {magnitude(visible)} "
                   f"(apply_plan differs by {magnitude(diff)})")


INTERVENTION_MODES = ("zero", "rescale", "mean", "resample", "uniform", "steer")
