"""Generic attention explainability (Chefer, Gur & Wolf 2021): gradient-weighted attention relevance.

Rules (numbers as in the paper):
  (5)  ``A_bar = mean_h (grad_A y * A)^+``
  (6, 7) self-attention in modality s: ``R_ss += A_bar R_ss``, ``R_sq += A_bar R_sq``
  (8, 9) ``R_bar = rownorm(R - I) + I``
  (10) co-attention, queries s, keys q: ``R_sq += R_bar_ss^T A_bar R_bar_qq``
  (11) ``R_ss += A_bar R_qs`` (skipped for encoder-decoder: the encoder does not see the decoder)
For a self-attention model (encoders, causal LMs, LLaVA-class VLMs whose language model sees image tokens in its
own sequence) only (5)-(7) apply, with R = I to start. The relevance of the input tokens for the explained output
is the row of R at the output position (the [CLS] token or the last token). Encoder-decoders (T5, BART, Whisper)
have their own rules: ``circuits.enc_dec_relevance`` (module ``encoder_decoder_relevance``).

Example:
    >>> import torch
    >>> from attnscope.circuits.relevance_propagation import self_attention_update
    >>> self_attention_update(torch.eye(2), torch.tensor([[0.0, 0.5], [0.0, 0.0]]))
    tensor([[1.0000, 0.5000],
            [0.0000, 1.0000]])
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import AnalysisError
from ..probes import eager_reference
from ..probes.adapter import ModelLike, as_adapter
from ..results import ResultTable
from .registry import register_analysis


def gradient_weighted_heads(attn: Float[Tensor, "head query key"],
                            grad: Float[Tensor, "head query key"]) -> Float[Tensor, "query key"]:
    """Rule (5): the head mean of the positive part of gradient times attention."""
    return (grad * attn).clamp(min=0).mean(0)


def self_attention_update(relevance: Float[Tensor, "query key"], a_bar: Float[Tensor, "query query"]) -> Tensor:
    """Rules (6)/(7): ``R + A_bar R``."""
    return relevance + a_bar @ relevance


def normalize_residual(relevance: Float[Tensor, "n n"]) -> Float[Tensor, "n n"]:
    """Rules (8, 9): subtract the identity, row-normalise what is left, add the identity back."""
    eye = torch.eye(relevance.shape[-1], dtype=relevance.dtype)
    hat = relevance - eye
    sums = hat.sum(-1, keepdim=True)
    return torch.where(sums > 0, hat / sums.clamp_min(1e-12), hat) + eye


def co_attention_update(r_ss: Tensor, r_qq: Tensor, r_sq: Tensor, r_qs: Tensor | None, a_bar: Tensor,
                        normalize: bool = True) -> tuple[Tensor, Tensor]:
    """Rules (10) and (11) for attention from modality s (queries) to modality q (keys): new (R_sq, R_ss)."""
    rs = normalize_residual(r_ss) if normalize else r_ss
    rq = normalize_residual(r_qq) if normalize else r_qq
    new_sq = r_sq + rs.T @ a_bar @ rq
    new_ss = r_ss + a_bar @ r_qs if r_qs is not None else r_ss
    return new_sq, new_ss


@dataclass
class Relevance:
    """Relevance matrix ``R [query, key]`` of one input, the explained position and its row, token strings, and
    (VLMs) the row restricted to image tokens reshaped to the patch grid."""

    matrix: Tensor
    position: int
    target: int | None
    tokens: list[str] | None
    image_map: Tensor | None = None

    @property
    def row(self) -> Tensor:
        return self.matrix[self.position]


def _score(output: Any, target: "int | Callable | None", position: int) -> tuple[Tensor, int | None]:
    if callable(target):
        return target(output), None
    logits = getattr(output, "logits", None)
    if logits is None and target is not None:
        raise AnalysisError("a target needs a model with logits", expected="a classifier or language model head "
                            "(or no target)", got=f"target {target} for a model without logits",
                            fix="leave --target out: a headless encoder explains its mean-pooled embedding")
    if logits is None:
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        return hidden[0].mean(0).norm(), None  # headless encoder: the mean-pooled embedding's norm
    logits = logits[0, position] if logits.ndim == 3 else logits[0]
    index = int(logits.argmax()) if target is None else int(target)
    if not 0 <= index < logits.shape[-1]:
        raise AnalysisError("target out of range", expected=f"0 <= target < {logits.shape[-1]}", got=index,
                            fix="pass a class or token id the model's output has")
    return logits[index], index


def relevance(model: ModelLike, inputs: Any, target: "int | Callable | None" = None, *, position: int | None = None,
              tower: str = "text", start_layer: int = 0) -> Relevance:
    """Chefer et al. relevance of the input tokens for ``target`` (class or token id; default: the argmax; or a
    callable ``output -> scalar``) at ``position`` (default: 0 for encoders with [CLS], the last token otherwise).

    One input item (batch size 1). The model runs eager attention for this computation (SDPA returns no
    probabilities to differentiate); the switch is undone afterwards.
    """
    adapter = as_adapter(model)
    prepared = adapter.prepare(inputs)
    n_items = next(v for v in prepared.kwargs.values() if torch.is_tensor(v)).shape[0]
    if n_items != 1:
        raise AnalysisError("relevance explains one input at a time", expected="batch size 1", got=n_items,
                            fix="loop over the inputs")
    info = adapter.info()
    if info.family == "encoder-decoder":
        raise AnalysisError("relevance here is the self-attention rule", expected="an encoder, causal LM or VLM",
                            got="an encoder-decoder", fix="use attnscope.circuits.enc_dec_relevance (Chefer's "
                            "encoder-decoder rules; `attnscope attribute --method relevance` picks it)")
    if position is None:
        position = -1 if info.family in ("causal-lm", "vlm") else 0
    ids = prepared.kwargs.get("input_ids")
    length = int(ids.shape[-1]) if torch.is_tensor(ids) else None
    if isinstance(position, bool) or not isinstance(position, int) or \
            (length is not None and not -length <= position < length):
        raise AnalysisError("position out of range", expected=f"-{length} <= position < {length}", got=position,
                            fix=f"the input has {length} tokens: pick one of them (negative counts from the end)")
    sites = {mid: s for mid, s in adapter._sites().items() if s.tower == tower and s.kind == "self"}
    with torch.enable_grad(), eager_reference(adapter.module, sites, keep_grad=True) as collected:
        output = adapter.module(**prepared.kwargs)
        score, index = _score(output, target, position)
        score.backward()
    ordered = sorted(collected)
    n = collected[ordered[0]][0].shape[-1]
    matrix = torch.eye(n)
    for site in ordered[start_layer:]:
        attn = collected[site][0]
        if attn.grad is None:
            raise AnalysisError("no gradient reached an attention layer", expected="a differentiable target",
                                got=str(site))
        matrix = self_attention_update(matrix, gradient_weighted_heads(attn[0].detach(), attn.grad[0]).float())
    strings = prepared.tokens.strings[0] if prepared.tokens.strings else None
    result = Relevance(matrix, position % n, index, strings)
    cls_first = getattr(getattr(adapter.module, "config", None), "vision_feature_select_strategy", None) == "full"
    result.image_map = _image_map(result.row, prepared.tokens, leading=int(cls_first))
    return result


def _image_map(row: Tensor, tokens: Any, leading: int = 0) -> Tensor | None:
    """The row at the image tokens on the patch grid; ``leading`` non-patch tokens (LLaVA's ``full`` CLS) skipped."""
    positions = tokens.positions("image")[leading:]
    if not positions:
        return None
    side = int(round(len(positions) ** 0.5))
    values = row[positions]
    return values.reshape(side, side) if side * side == len(positions) else values


@register_analysis("relevance", takes="model", description="Chefer et al. 2021 gradient-weighted relevance")
def relevance_table(model: ModelLike, inputs: Any, target: "int | None" = None, position: int | None = None,
                    **options: Any) -> ResultTable:
    """Relevance of each input token as a ResultTable (``analysis=attribution``, ``metric=relevance``)."""
    result = relevance(model, inputs, target, position=position, **options)
    tokens = result.tokens or [str(i) for i in range(len(result.row))]
    records = [{"analysis": "attribution", "layer": -1, "head": -1, "metric": "relevance", "value": float(v),
                "token_index": i, "token": tokens[i]} for i, v in enumerate(result.row)]
    return ResultTable.from_records(records, provenance={"method": "chefer2021", "target": result.target,
                                                         "position": result.position})
