"""Chefer, Gur & Wolf 2021 relevance for encoder-decoders (T5, BART, Marian, Whisper ...): the paper's rules for
encoder self-attention (``encoder.L*.self``), decoder self-attention (``decoder.L*.self``) and the decoder's
cross-attention to the encoder (``decoder.L*.cross``), as in the authors' ``DETR/modules/ExplanationGenerator.py``
(``Generator.generate_ours`` with ``use_lrp=False``; hila-chefer/Transformer-MM-Explainability).

With ``A_bar = mean_h (grad_A y * A)^+`` per site (rule 5) and ``R_ss = I`` (encoder), ``R_qq = I`` (decoder),
``R_qs = 0`` (decoder position x encoder token) to start:
  encoder self-attention, each layer:   ``R_ss += A_bar R_ss``
  decoder layer, self-attention first:  ``R_qq += A_bar R_qq``, ``R_qs += A_bar R_qs`` (rules 6-7)
  then its cross-attention:             ``R_qs += R_bar_qq^T A_bar R_bar_ss``
with ``R_bar = (R - I) / rowsum(R - I) + I`` (``handle_residual``; eqs. 8-9). Like the reference, a row of
``R - I`` that sums to 0 makes that layer's addition NaN, which is then set to 0: the cross-attention of that layer
adds nothing (``zeroed_cross_layers`` names them). The decoder runs on its prefix up to the explained position, so
later decoder tokens (which the output cannot see) do not cause that. The rules run in float64: with small
gradients (BART's init) ``R - I`` cancels to exact zeros in float32 and would trip that rule spuriously.

Example:
    >>> import torch, transformers
    >>> from attnscope.circuits.encoder_decoder_relevance import enc_dec_relevance
    >>> cfg = transformers.BartConfig(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2,
    ...     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
    ...     max_position_embeddings=64, decoder_start_token_id=1)
    >>> _ = torch.manual_seed(0)
    >>> bart = transformers.BartForConditionalGeneration(cfg).eval()
    >>> result = enc_dec_relevance(bart, torch.tensor([[5, 9, 12, 33, 7, 2]]))
    >>> tuple(result.r_qs.shape), tuple(result.r_ss.shape), tuple(result.r_qq.shape), result.position
    ((6, 6), (6, 6), (6, 6), 5)
    >>> bool((result.row >= 0).all())
    True
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import AnalysisError, InputError
from ..probes import eager_reference
from ..probes.adapter import ModelLike, as_adapter
from ..results import ResultTable
from .registry import register_analysis
from .relevance_propagation import _score, gradient_weighted_heads, self_attention_update

METHOD = "chefer2021-encoder-decoder"


def handle_residual(relevance: Float[Tensor, "n n"]) -> Float[Tensor, "n n"]:
    """Eqs. 8-9 as the reference computes them: ``(R - I)`` row-normalised, plus ``I``; a zero row gives NaN."""
    eye = torch.eye(relevance.shape[-1], dtype=relevance.dtype)
    hat = relevance - eye
    return hat / hat.sum(-1, keepdim=True) + eye


def _rule_10(r_qq: Tensor, r_ss: Tensor, a_bar: Tensor, normalize: bool, self_in_rule_10: bool) -> Tensor:
    """Rule 10 for decoder queries attending to encoder keys, ``R_bar_qq^T A_bar R_bar_ss``, before the NaN rule.
    ``normalize`` / ``self_in_rule_10`` are the reference's ``normalize_self_attention`` /
    ``apply_self_in_rule_10`` ablations (``False``: no eq. 8-9 normalisation / the addition is ``A_bar`` alone)."""
    if not self_in_rule_10:
        return a_bar.clone()
    rq = handle_residual(r_qq) if normalize else r_qq
    rs = handle_residual(r_ss) if normalize else r_ss
    return rq.T @ (a_bar @ rs)


def propagate(encoder: list[Tensor], decoder: list[tuple[Tensor, Tensor]], normalize: bool = True,
              self_in_rule_10: bool = True) -> tuple[Tensor, Tensor, Tensor, list[int]]:
    """The rules over per-layer ``A_bar``: encoder self-attention maps in forward order, then per decoder layer
    ``(self A_bar, cross A_bar)``. Returns ``R_qs, R_ss, R_qq`` and the decoder layers whose cross addition was
    zeroed by a NaN."""
    if not decoder:
        raise AnalysisError("no decoder layers", expected="at least one decoder self + cross attention layer",
                            got=0, fix="pass a model with encoder and decoder stacks")
    n_enc, n_dec = decoder[0][1].shape[-1], decoder[0][0].shape[-1]
    dtype = decoder[0][1].dtype
    r_ss = torch.eye(n_enc, dtype=dtype)
    for a_bar in encoder:
        r_ss = self_attention_update(r_ss, a_bar)
    r_qq, r_qs = torch.eye(n_dec, dtype=dtype), torch.zeros(n_dec, n_enc, dtype=dtype)
    zeroed = []
    for layer, (self_bar, cross_bar) in enumerate(decoder):
        r_qq, r_qs = self_attention_update(r_qq, self_bar), r_qs + self_bar @ r_qs  # rules 6, 7
        raw = _rule_10(r_qq, r_ss, cross_bar, normalize, self_in_rule_10)
        if bool(torch.isnan(raw).any()):
            zeroed.append(layer)
        r_qs = r_qs + torch.where(torch.isnan(raw), torch.zeros_like(raw), raw)
    return r_qs, r_ss, r_qq, zeroed


@dataclass
class EncoderDecoderRelevance:
    """``r_qs [decoder position, encoder token]``, ``r_ss`` (encoder), ``r_qq`` (decoder), all float64; the
    explained decoder position and output token, token labels, the decoder layers the NaN rule zeroed."""

    r_qs: Tensor
    r_ss: Tensor
    r_qq: Tensor
    position: int
    target: int | None
    encoder_tokens: list[str]
    decoder_tokens: list[str]
    zeroed_cross_layers: list[int] = field(default_factory=list)

    @property
    def row(self) -> Tensor:
        """Relevance of each encoder token for the explained output (the row of ``r_qs`` at ``position``)."""
        return self.r_qs[self.position]


def _a_bars(collected: dict, tower: str, kind: str) -> list[Tensor]:
    sites = sorted((s for s in collected if s.tower == tower and s.kind == kind), key=lambda s: s.layer)
    bars = []
    for site in sites:
        attn = collected[site][0]
        if attn.grad is None:
            raise AnalysisError("no gradient reached an attention layer", expected="a differentiable target",
                                got=str(site))
        bars.append(gradient_weighted_heads(attn[0].detach().double(), attn.grad[0].double()))
    return bars


def _prefix(kwargs: dict, position: int | None) -> tuple[dict, int]:
    """The forward kwargs with the decoder cut after the explained position (the decoder is causal)."""
    ids = kwargs.get("decoder_input_ids")
    if not torch.is_tensor(ids):
        raise InputError("encoder-decoder relevance needs decoder ids", expected="decoder_input_ids",
                         got=sorted(kwargs), fix="pass {'input_ids': ..., 'decoder_input_ids': ...}, not labels")
    n = int(ids.shape[-1])
    position = n - 1 if position is None else position
    if isinstance(position, bool) or not isinstance(position, int) or not -n <= position < n:
        raise AnalysisError("position out of range", expected=f"-{n} <= position < {n} (a decoder position)",
                            got=position, fix=f"the decoder has {n} tokens: pick one (negative counts from the end)")
    end = position % n + 1
    cut = {k: v[:, :end] if k in ("decoder_input_ids", "decoder_attention_mask") and torch.is_tensor(v) else v
           for k, v in kwargs.items()}
    return cut, end - 1


def _labels(ids: Any, tokenizer: Any, n: int, stem: str) -> list[str]:
    if torch.is_tensor(ids) and tokenizer is not None and int(ids.shape[-1]) == n:
        return [str(t) for t in tokenizer.convert_ids_to_tokens(ids[0].tolist())]
    if torch.is_tensor(ids) and int(ids.shape[-1]) == n:
        return [str(i) for i in ids[0].tolist()]
    return [f"{stem}{i}" for i in range(n)]


def enc_dec_relevance(model: ModelLike, inputs: Any, target: "int | Callable | None" = None, *,
                      position: int | None = None, normalize: bool = True,
                      self_in_rule_10: bool = True) -> EncoderDecoderRelevance:
    """Chefer et al. relevance of the encoder tokens for ``target`` (token id; default the argmax; or a callable
    ``output -> scalar``) at decoder ``position`` (default the last). One input item; the model runs its own eager
    attention for this call (the captured weights and their gradients), then is switched back."""
    adapter = as_adapter(model)
    family = adapter.info().family
    if family != "encoder-decoder":
        raise AnalysisError("not an encoder-decoder", expected="a model with encoder and decoder towers (T5, BART, "
                            "Whisper ...)", got=family,
                            fix="use attnscope.circuits.relevance for self-attention models")
    prepared = adapter.prepare(inputs)
    n_items = next(v for v in prepared.kwargs.values() if torch.is_tensor(v)).shape[0]
    if n_items != 1:
        raise AnalysisError("relevance explains one input at a time", expected="batch size 1", got=n_items,
                            fix="loop over the inputs")
    kwargs, position = _prefix(prepared.kwargs, position)
    with torch.enable_grad(), eager_reference(adapter.module, adapter._sites(), keep_grad=True) as collected:
        output = adapter.module(**kwargs)
        score, index = _score(output, target, -1)
        score.backward()
    encoder = _a_bars(collected, "encoder", "self")
    selfs, crosses = _a_bars(collected, "decoder", "self"), _a_bars(collected, "decoder", "cross")
    if len(selfs) != len(crosses):
        raise AnalysisError("decoder layers without cross-attention", expected="one self and one cross attention per "
                            "decoder layer", got=f"{len(selfs)} self, {len(crosses)} cross",
                            fix="register an adapter that labels this model's decoder sites")
    decoder = list(zip(selfs, crosses))
    r_qs, r_ss, r_qq, zeroed = propagate(encoder, decoder, normalize, self_in_rule_10)
    tokenizer = getattr(adapter, "tokenizer", None)
    return EncoderDecoderRelevance(
        r_qs, r_ss, r_qq, position, index,
        _labels(kwargs.get("input_ids"), tokenizer, r_ss.shape[0], "frame "),
        _labels(kwargs["decoder_input_ids"], tokenizer, r_qq.shape[0], "dec "), zeroed)


@register_analysis("encoder-decoder-relevance", takes="model",
                   description="Chefer et al. 2021 relevance for encoder-decoders (decoder output -> encoder tokens)")
def enc_dec_relevance_table(model: ModelLike, inputs: Any, target: "int | None" = None, position: int | None = None,
                            normalize: bool = True, self_in_rule_10: bool = True) -> ResultTable:
    """Relevance of each encoder token for one decoder output as a ResultTable (``analysis=attribution``,
    ``metric=relevance``); provenance names the rule, the decoder position and tokens, and any zeroed layers."""
    result = enc_dec_relevance(model, inputs, target, position=position, normalize=normalize,
                               self_in_rule_10=self_in_rule_10)
    records = [{"analysis": "attribution", "layer": -1, "head": -1, "metric": "relevance", "value": float(v),
                "token_index": i, "token": result.encoder_tokens[i]} for i, v in enumerate(result.row)]
    return ResultTable.from_records(records, provenance={
        "method": METHOD, "rule": "Chefer et al. 2021 encoder-decoder rules (R_ss, R_qq, R_qs)",
        "target": result.target, "position": result.position, "position_of": "decoder",
        "decoder_tokens": result.decoder_tokens, "zeroed_cross_layers": result.zeroed_cross_layers,
        "normalize": normalize, "self_in_rule_10": self_in_rule_10})
