"""Reference sets of ``mean`` and ``resample`` edits for any modality: head outputs recorded on the model's own inputs.

A reference set is either token ids (``reference_ids``: lists of ints, right-padded, positions aligned from the
start; the text path) or ``reference_inputs``: anything the model's adapter ``prepare`` accepts (a dict of forward
tensors such as ``pixel_values``, ``input_features``, latents + timestep + text embeddings, ids + images), or a list
of such dicts. Each dict is one batch; its rows are the reference rows. The model runs each batch once (a
diffusers pipeline: its denoiser) while ``record_head_outputs`` keeps every edited layer's head outputs.

Positions: a layer whose sequence is the width of the reference's 2-D ``attention_mask`` is text-aligned (padding
is masked, shorter references are allowed, as on the token path); every other layer (image patches, audio
frames, latents) must have exactly as many positions on the reference as on the edited input, else the edit raises
``ReferenceMismatchError``. Inputs that do not fit the model (missing keys, wrong shapes) raise it up front.

Example:
    >>> import torch
    >>> from attnscope.probes.reference_inputs import decode_inputs, encode_inputs, is_token_lists
    >>> refs = {"pixel_values": torch.ones(1, 3, 2, 2)}
    >>> torch.equal(decode_inputs(encode_inputs(refs))["pixel_values"], refs["pixel_values"])
    True
    >>> is_token_lists([[1, 2], [3]]), is_token_lists(refs)
    (True, False)
"""

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import AttnscopeError, InputError, ReferenceMismatchError, UnsupportedModelError
from .adapter import adapter_for, module_of
from .head_slices import record_head_outputs

_TENSOR = "__tensor__"
_RUN_ERRORS = (TypeError, ValueError, RuntimeError, IndexError, KeyError, AttributeError)


def is_token_lists(value: Any) -> bool:
    """True for token-id reference sets: a non-empty list of int lists (the ``reference_ids`` path)."""
    return isinstance(value, (list, tuple)) and bool(value) and all(
        isinstance(row, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in row)
        for row in value)


def encode_inputs(value: Any) -> Any:
    """JSON-able form of reference inputs: tensors become ``{"__tensor__": dtype, "shape", "values"}``."""
    if torch.is_tensor(value):
        return {_TENSOR: str(value.dtype).removeprefix("torch."), "shape": list(value.shape),
                "values": value.detach().cpu().flatten().tolist()}
    if isinstance(value, Mapping):
        return {str(k): encode_inputs(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_inputs(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise InputError("reference inputs cannot be written to JSON", expected="tensors, dicts, lists, numbers, text",
                     got=type(value).__name__, fix="give the reference inputs as tensors (what the processor makes)")


def decode_inputs(value: Any) -> Any:
    """The inverse of ``encode_inputs``."""
    if isinstance(value, Mapping):
        if _TENSOR in value:
            dtype = getattr(torch, str(value[_TENSOR]))
            return torch.tensor(value["values"], dtype=dtype).reshape(value["shape"])
        return {k: decode_inputs(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_inputs(v) for v in value]
    return value


@dataclass
class ReferenceOutputs:
    """Clean head outputs of a reference set.

    ``outs[layer]``: ``[n_ref, positions, head, d_head]``; ``valid[layer]``: ``[n_ref, positions]`` (text-aligned
    layers) or None (fixed-shape layers: every position valid, shapes must match); ``lengths``: tokens per
    reference row (None without a mask); ``rows``: each reference row's input tensors (to avoid drawing the row
    itself).
    """

    outs: dict[int, Tensor]
    valid: dict[int, "Tensor | None"]
    lengths: "list[int] | None"
    rows: list[dict[str, Tensor]]


def _items(references: Any) -> list[Any]:
    if isinstance(references, (list, tuple)) and references and all(isinstance(r, Mapping) for r in references):
        return list(references)
    return [references]


def denoiser_of(model: Any) -> Any:
    """A diffusers pipeline's denoiser (``unet`` / ``transformer``): what reference inputs run; else ``model``."""
    for attr in ("unet", "transformer"):
        if not isinstance(model, nn.Module) and isinstance(getattr(model, attr, None), nn.Module):
            return getattr(model, attr)
    return model


def _keys_of(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {tuple(v.shape)}" if torch.is_tensor(v) else k for k, v in kwargs.items())


def _check_keys(target: nn.Module, kwargs: Mapping[str, Any]) -> None:
    """Keys the forward does not name (when it takes no ``**kwargs``), or its required ones missing."""
    params = inspect.signature(target.forward).parameters
    named = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    required = [n for n, p in params.items() if p.default is p.empty and p.kind not in (p.VAR_KEYWORD,
                                                                                      p.VAR_POSITIONAL)]
    open_ended = any(p.kind == p.VAR_KEYWORD for p in params.values())
    unknown = [] if open_ended else sorted(set(kwargs) - named)
    missing = [n for n in required if n not in kwargs]
    main = getattr(target, "main_input_name", None)
    if main and main in named and main not in kwargs and "inputs_embeds" not in kwargs:
        missing.append(main)
    if unknown or missing:
        raise ReferenceMismatchError(
            "reference inputs do not fit the model", expected=f"{type(target).__name__} forward inputs"
            f"{' incl. ' + ', '.join(missing) if missing else ''}", got=_keys_of(kwargs) +
            (f" (unknown: {', '.join(unknown)})" if unknown else ""),
            fix="give reference inputs of the same kind as the model's inputs (another batch of them)")


def row_tensors(kwargs: Mapping[str, Any], n: int) -> list[dict[str, Tensor]]:
    """Each of ``n`` rows' input tensors: row slices of batch-first tensors, the whole tensor otherwise (packed
    image patches, a timestep): two rows are the same input only when all of these are equal."""
    rows: list[dict[str, Tensor]] = [{} for _ in range(n)]
    for key, value in kwargs.items():
        if torch.is_tensor(value):
            for i in range(n):
                rows[i][key] = (value[i] if value.ndim and value.shape[0] == n else value).detach()
    return rows


def batch_size(target: nn.Module, kwargs: Mapping[str, Any]) -> int:
    """Rows of a forward: the main input's first dimension (else the first tensor of two or more dimensions)."""
    main = kwargs.get(getattr(target, "main_input_name", "") or "")
    if not torch.is_tensor(main) and "input_ids" in kwargs:
        main = kwargs["input_ids"]
    if not torch.is_tensor(main):
        main = next((v for v in kwargs.values() if torch.is_tensor(v) and v.ndim >= 2), None)
    return int(main.shape[0]) if main is not None else 1


def _run_item(target: nn.Module, module: Any, item: Any, layers: list[int]) -> tuple[dict[int, Tensor], Any, dict]:
    adapter = adapter_for(target)
    try:
        kwargs = adapter.prepare(item).kwargs
    except AttnscopeError as error:
        raise ReferenceMismatchError("reference inputs do not fit the model", expected=error.expected,
                                     got=error.got, fix=error.fix or "give inputs like the model's own") from error
    _check_keys(target, kwargs)
    with record_head_outputs(module, layers) as seen, torch.no_grad():
        try:
            target(**kwargs)
        except _RUN_ERRORS as error:
            raise ReferenceMismatchError(
                "the model cannot run on the reference inputs", expected=f"inputs {type(target).__name__} runs on",
                got=f"{_keys_of(kwargs)}: {type(error).__name__}: {str(error)[:160]}",
                fix="give reference inputs of the same kind and shape as the model's inputs") from error
    silent = [layer for layer in layers if not seen[layer]]
    if silent:
        raise UnsupportedModelError("a layer did not run on the reference inputs",
                                    expected="every edited layer to run", got=f"layers {silent}",
                                    fix="add what those layers attend to (e.g. images) to the reference inputs")
    mask = kwargs.get("attention_mask")
    mask = mask if torch.is_tensor(mask) and mask.ndim == 2 else None
    return {layer: seen[layer][-1] for layer in layers}, mask, kwargs


def _pad_positions(x: Tensor, width: int) -> Tensor:
    if x.shape[1] == width:
        return x
    return torch.cat([x, x.new_zeros(x.shape[0], width - x.shape[1], *x.shape[2:])], 1)


@torch.no_grad()
def record_reference_inputs(model: Any, references: Any, layers: list[int]) -> ReferenceOutputs:
    """Head outputs of ``layers`` on ``references`` (see the module docstring), one forward per batch."""
    module = model
    target = denoiser_of(module)
    if not isinstance(target, nn.Module):
        raise InputError("no model to run the reference inputs on", expected="a torch module or a diffusers "
                         "pipeline", got=type(target).__name__)
    outs: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    valid: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    aligned = dict.fromkeys(layers, True)
    rows: list[dict[str, Tensor]] = []
    lengths: list[int] = []
    for item in _items(references):
        seen, mask, kwargs = _run_item(target, module, item, layers)
        n = batch_size(target, kwargs)
        rows += row_tensors(kwargs, n)
        lengths += mask.sum(1).tolist() if mask is not None else [0] * n
        for layer, x in seen.items():
            text = mask is not None and mask.shape == x.shape[:2]
            aligned[layer] = aligned[layer] and text
            outs[layer].append(x)
            valid[layer].append(mask.bool() if text else torch.ones(x.shape[:2], dtype=torch.bool))
    merged, masks = {}, {}
    for layer in layers:
        widths = {x.shape[1] for x in outs[layer]}
        if len(widths) > 1 and not aligned[layer]:
            raise ReferenceMismatchError("reference batches of different shapes", expected=f"one number of "
                                         f"positions at layer {layer}", got=sorted(widths),
                                         fix="give every reference batch the same image / audio / latent size")
        width = max(widths)
        merged[layer] = torch.cat([_pad_positions(x, width) for x in outs[layer]])
        masks[layer] = torch.cat([_pad_positions(v, width) for v in valid[layer]]).to(merged[layer].device) \
            if aligned[layer] else None
    has_mask = any(m is not None for m in masks.values())
    return ReferenceOutputs(merged, masks, lengths if has_mask else None, rows)


def same_row(reference: Mapping[str, Tensor], row: Mapping[str, Tensor], length: "int | None") -> bool:
    """True when the reference row holds the same input as ``row`` (token ids compared over ``length``)."""
    shared = [k for k in reference if k in row]
    if not shared:
        return False
    for key in shared:
        a, b = reference[key], row[key].to(reference[key].device)
        if key == "input_ids" and length is not None:
            if a.shape[0] < length or not torch.equal(a[:length], b[:length]):
                return False
        elif a.shape != b.shape or not torch.equal(a, b):
            return False
    return True


def check_positions(layer: int, n_run: int, n_ref: int) -> None:
    """A fixed-shape layer needs as many positions on the reference as on the edited input."""
    if n_run != n_ref:
        raise ReferenceMismatchError(
            "reference inputs do not fit the edited input", expected=f"{n_run} positions at layer {layer} (as "
            "the input: same image size / patches, audio length, latent size)", got=f"{n_ref} positions on the "
            "reference inputs", fix="give reference inputs of the same shape as the edited input")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pad(sequences: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(sequences):
        ids[i, :len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[i, :len(seq)] = 1
    return ids, mask


_OTHER_INPUTS = "pass reference_inputs instead: other inputs of the model's own kind (e.g. {'pixel_values': ...})"


@torch.no_grad()
def reference_head_outputs(model: nn.Module, reference_ids: Sequence[Sequence[int]], layers: list[int],
                           batch_size: int = 16, pad_id: int = 0) -> tuple[dict[int, Tensor], Tensor]:
    """Clean head outputs of token-id references: ``layer -> [n_ref, max_len, head, d_head]`` and the mask.

    Inputs are right-padded; padded positions hold the model's values there (mask them with the returned mask).
    """
    model = module_of(model)
    if not reference_ids:
        raise InputError("no reference inputs", expected="at least one token-id list", got=0)
    if getattr(model, "main_input_name", "input_ids") != "input_ids":
        raise UnsupportedModelError("reference token inputs do not fit this model", expected="a model fed "
                                    "input_ids", got=f"{type(model).__name__} takes {model.main_input_name}",
                                    fix=_OTHER_INPUTS)
    adapter = adapter_for(model)  # e.g. encoder-decoders get their decoder ids the same way as in a capture
    if not adapter.runs_on_text_alone:
        raise UnsupportedModelError("reference token inputs alone cannot run this model", expected="a model that "
                                    "runs on text alone", got=f"{type(model).__name__} needs images as well",
                                    fix="pass reference_inputs with images and text (a dict of tensors)")
    width = max(len(s) for s in reference_ids)
    outs: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    masks = []
    for start in range(0, len(reference_ids), batch_size):
        ids, mask = _pad(reference_ids[start:start + batch_size], pad_id)
        ids = torch.nn.functional.pad(ids, (0, width - ids.shape[1]), value=pad_id)
        mask = torch.nn.functional.pad(mask, (0, width - mask.shape[1]))
        kwargs = adapter.prepare({"input_ids": ids.to(_device(model)), "attention_mask": mask.to(_device(model))})
        with record_head_outputs(model, layers) as seen:
            model(**kwargs.kwargs)
        silent = [layer for layer in layers if not seen[layer]]
        if silent:
            raise UnsupportedModelError("a layer did not run on the reference token inputs",
                                        expected="every edited layer to run on text alone",
                                        got=f"layers {silent} (e.g. cross-attention to images)",
                                        fix="pass reference_inputs with what these layers attend to (images), "
                                        "or give mean_values")
        for layer in layers:
            outs[layer].append(seen[layer][-1])
        masks.append(mask)
    return {layer: torch.cat(parts) for layer, parts in outs.items()}, torch.cat(masks)


def reference_outputs(model: Any, references: Any, layers: list[int], batch_size: int = 16) -> ReferenceOutputs:
    """Head outputs of a reference set: token-id lists (the text path) or reference inputs of any modality."""
    if is_token_lists(references):
        outs, mask = reference_head_outputs(model, references, layers, batch_size)
        valid = mask.bool()
        return ReferenceOutputs(outs, {layer: valid.to(outs[layer].device) for layer in layers},
                                mask.sum(1).tolist(), [{"input_ids": torch.tensor(list(r))} for r in references])
    if references is None or (isinstance(references, (list, tuple)) and not references):
        raise InputError("no reference inputs", expected="token-id lists or a batch of the model's inputs",
                         got=references, fix="pass reference_ids or reference_inputs")
    return record_reference_inputs(module_of(model), references, layers)


def as_sequences(reference_ids: Sequence[Sequence[int]]) -> list[list[int]]:
    return [list(map(int, r)) for r in reference_ids]


__all__ = ["ReferenceOutputs", "as_sequences", "check_positions", "decode_inputs",
           "denoiser_of", "encode_inputs", "is_token_lists", "record_reference_inputs", "reference_head_outputs",
           "reference_outputs", "row_tensors", "same_row", "batch_size"]
