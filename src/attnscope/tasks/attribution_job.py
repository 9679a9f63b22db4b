"""``attnscope attribute``: how much each input token of one text contributes to one output token.

Methods (``METHODS``): ``rollout`` (Abnar & Zuidema), ``flow`` (exact max-flow), ``relevance`` (Chefer et al.;
encoder-decoders get the paper's encoder-decoder rules, ``--position`` then counts decoder tokens) and
``attention`` (raw attention, heads fused like rollout). ``run_attribution_job`` checks the output path
(before any work), loads the model, attributes and writes the table.

Example:
    >>> import tempfile, pathlib
    >>> from attnscope.tasks.attribution_job import AttributionRequest, run_attribution_job
    >>> from attnscope.tasks.references import ModelRef
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "rollout.parquet"
    >>> result = run_attribution_job(AttributionRequest(ModelRef.parse("minilm"), "Paris is in France.", out))
    >>> result.path == out, result.table.df.layer.nunique(), result.table.provenance["position"]
    (True, 6, 0)
    >>> print(result.summary().splitlines()[0])
    rollout attribution (minilm), top tokens at layer 5:
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .._atomic import check_output
from .._progress import stage
from ..circuits.attention_rollout import rollout
from ..circuits.encoder_decoder_relevance import enc_dec_relevance_table
from ..circuits.flow import attention_flow
from ..circuits.relevance_propagation import relevance_table
from ..circuits.token_attribution import attribution_table
from ..errors import InputError
from ..probes.adapter import ModelAdapter
from ..probes.capturing import capture
from ..results import ResultTable
from .models import load_ref
from .references import ModelRef

METHODS = ("rollout", "flow", "relevance", "attention")


@dataclass(frozen=True)
class AttributionRequest:
    """One text, the method, the output token (``position``; default [CLS] = 0 for encoders, else the last),
    ``layer`` (one layer's joint attention; default all), ``target`` (relevance: class or token id), how heads are
    fused and the weight of the residual stream (rollout, flow, attention)."""

    model: ModelRef
    text: str
    out: "Path | str"
    method: str = "rollout"
    layer: int | None = None
    position: int | None = None
    target: int | None = None
    head_fusion: str = "mean"
    residual_weight: float = 0.5


@dataclass
class AttributionResult:
    """The table, where it went, the method and the model's name."""

    method: str
    model: str
    table: ResultTable
    path: Path

    def summary(self, top: int = 8) -> str:
        """What ``attnscope attribute`` prints: the top tokens (of the last layer)."""
        df = self.table.df
        last = df[df["layer"] == df["layer"].max()]
        rows = last.sort_values("value", ascending=False).head(top)
        layer = f" at layer {int(last['layer'].iloc[0])}" if self.method != "relevance" else ""
        if self.table.provenance.get("position_of") == "decoder":  # encoder-decoder relevance
            layer = f" (encoder-decoder rule, decoder position {self.table.provenance['position']})"
        lines = [f"{self.method} attribution ({self.model}), top tokens{layer}:"]
        lines += [f"  {row.token_index:4d} {str(row.token):>15s} {row.value:.4f}" for row in rows.itertuples()]
        if self.table.provenance.get("zeroed_cross_layers"):  # Chefer's eq. 9 divided by a zero row
            lines.append(f"note: decoder layers {self.table.provenance['zeroed_cross_layers']} added no cross "
                         "relevance (a token without positive relevance makes the reference's eq. 9 NaN)")
        return "\n".join([*lines, f"wrote {self.path}"])


def run_attribution_job(request: AttributionRequest) -> AttributionResult:
    """Check the method and the output path, load the model, attribute, write the table."""
    if request.method not in METHODS:
        raise InputError("unknown attribution method", expected=list(METHODS), got=request.method,
                         fix="pass --method " + "|".join(METHODS))
    out = check_output(request.out)
    model = load_ref(request.model)
    stage(f"computing {request.method}")
    if request.method == "relevance" and model.info().family == "encoder-decoder":  # Chefer's enc-dec rules
        table = enc_dec_relevance_table(model, [request.text], target=request.target, position=request.position)
        table.provenance.update({"model": model.name, "text": request.text})
    elif request.method == "relevance":
        table = relevance_table(model, [request.text], target=request.target, position=request.position)
    else:
        table = _attention_table(request, model)
    return AttributionResult(request.method, model.name, table, table.save(out))


def _attention_table(request: AttributionRequest, model: ModelAdapter) -> ResultTable:
    values, tokens, position = token_values(request, model)
    n_layers = values.shape[0]
    if request.layer is not None and not -n_layers <= request.layer < n_layers:
        raise InputError("layer out of range", expected=f"-{n_layers} <= layer < {n_layers}", got=request.layer)
    layers = [request.layer % n_layers] if request.layer is not None else list(range(n_layers))
    table = attribution_table(values[layers], tokens=tokens, method=request.method, layer_index=layers)
    table.provenance.update({"model": model.name, "text": request.text, "position": position})
    return table


def token_values(request: AttributionRequest, model: ModelAdapter) -> tuple[Tensor, list[str], int]:
    """Per-layer attribution rows ``[layer, key]`` of the output token, the token strings and the position."""
    trace = capture(model, [request.text])
    attn = trace.stack()[:, 0]  # [layer, head, query, key]
    position = request.position if request.position is not None else (0 if model.info().family == "encoder" else -1)
    n = attn.shape[-2]
    if not -n <= position < n:
        raise InputError("--position out of range", expected=f"-{n} <= position < {n}", got=position,
                         fix=f"the text has {n} tokens: pick one of them (negative counts from the end)")
    options = {"head_fusion": request.head_fusion, "residual_weight": request.residual_weight}
    if request.method == "rollout":
        joint = rollout(attn, **options)
    elif request.method == "flow":
        joint = attention_flow(attn, **options)
    else:  # raw attention, heads fused the same way
        joint = {"mean": attn.mean(1), "max": attn.amax(1), "min": attn.amin(1)}[request.head_fusion]
    joint = torch.as_tensor(joint)
    return joint[:, position, :], trace.tokens.strings[0], position
