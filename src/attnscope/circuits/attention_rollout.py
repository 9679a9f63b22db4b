"""Attention rollout (Abnar & Zuidema 2020), and the input handling it shares with attention flow.

Per layer, heads are fused (``mean`` by default; ``max``/``min`` as in third-party ViT tools), optionally some key
columns are excluded (e.g. sink tokens) and the lowest entries discarded, then the residual is added:
``A_hat = rownorm(residual_weight * I + (1 - residual_weight) * fused)``; with ``residual_weight=0.5`` and
row-stochastic attention this is the reference ``aug = A + I; aug /= aug.sum(-1)``. Rollout multiplies the newer
layer on the left: ``J_start = A_hat_start``, ``J_l = A_hat_l @ J_{l-1}``. Row ``i`` of ``J_l`` is how much of token
``i``'s representation after layer ``l`` traces back to each input token.

Differences from jacobgil/vit-explain's ``rollout`` (by design, see ``discard_lowest``): its discard keeps only flat
index 0 and renormalises ``(A + I) / 2`` by the *row sums of the original matrix* after dropping entries, so its rows
no longer sum to 1 (its known normalisation bug, jacobgil/vit-explain#16); here the whole diagonal is kept and every
``A_hat`` row is renormalised. With ``discard_ratio=0`` (the default, Abnar & Zuidema's setting) both agree.

Example:
    >>> import torch
    >>> from attnscope.circuits.attention_rollout import rollout
    >>> attn = torch.softmax(torch.randn(3, 2, 4, 4), -1)        # [layer, head, query, key]
    >>> joint = rollout(attn)                                      # [layer, query, key]
    >>> joint.shape, bool(torch.allclose(joint.sum(-1), torch.ones(3, 4)))
    (torch.Size([3, 4, 4]), True)
    >>> rollout(attn, readout=0).shape                             # row of token 0 ([CLS]) per layer
    torch.Size([3, 4])
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import AnalysisError
from ..probes.trace import AttentionTrace

HEAD_FUSIONS = ("mean", "max", "min")
ROW_READOUTS = ("mean", "max")
Array = Tensor | np.ndarray
AttnInput = (AttentionTrace | Float[Tensor, "layer head query key"] | Float[Tensor, "layer batch head query key"]
             | Float[np.ndarray, "layer head query key"] | Float[np.ndarray, "layer batch head query key"])


@dataclass(frozen=True)
class InputKind:
    """How the caller gave the attention, so results come back the same way."""

    torch: bool
    batched: bool
    dtype: Any
    device: Any = None

    def wrap(self, values: np.ndarray) -> Array:
        """``values`` has a batch axis at position 1; drop it when unbatched and convert back."""
        if not self.batched:
            values = values[:, 0]
        if self.torch:
            return torch.as_tensor(values, dtype=self.dtype, device=self.device)
        return values.astype(self.dtype, copy=False)


def layer_stack(attn: AttnInput, *, tower: str | None = None, kind: str = "self", validate: bool = True,
                atol: float = 1e-3) -> tuple[np.ndarray, InputKind]:
    """``[layer, batch, head, query, key]`` float64 numpy copy of the input, and how it was given.

    validate: also require every row to sum to 1 within ``atol`` (finite, non-negative values always required)."""
    if isinstance(attn, AttentionTrace):
        attn = attn.stack(tower=tower, kind=kind)
    if isinstance(attn, Tensor):
        dtype = attn.dtype if attn.is_floating_point() else torch.float32
        info = InputKind(True, attn.ndim == 5, dtype, attn.device)
        array = attn.detach().to("cpu", torch.float64).numpy()
    elif isinstance(attn, np.ndarray):
        dtype = attn.dtype if np.issubdtype(attn.dtype, np.floating) else np.float64
        info, array = InputKind(False, attn.ndim == 5, dtype), np.asarray(attn, dtype=np.float64)
    else:
        raise AnalysisError("attention of an unsupported type", expected="AttentionTrace, torch.Tensor or numpy array",
                            got=type(attn).__name__)
    if array.ndim not in (4, 5):
        raise AnalysisError("attention has the wrong number of dimensions",
                            expected="[layer, head, query, key] or [layer, batch, head, query, key]",
                            got=f"shape {tuple(array.shape)}", fix="stack per-layer probabilities along a first axis")
    if array.ndim == 4:
        array = array[:, None]
    _check_values(array, validate, atol)
    return array, info


def _check_values(array: np.ndarray, validate: bool, atol: float) -> None:
    if array.size == 0:
        raise AnalysisError("attention is empty", expected="at least one layer, head, query and key",
                            got=f"shape {tuple(array.shape)}")
    if not np.isfinite(array).all():
        raise AnalysisError("attention has NaN or infinite values", expected="finite probabilities", got="non-finite",
                            fix="capture with eager attention in float32")
    if array.min() < 0:
        raise AnalysisError("attention has negative values", expected="probabilities >= 0",
                            got=f"min {array.min():.3g}", fix="pass post-softmax probabilities, not logits")
    if validate:
        worst = float(np.abs(array.sum(-1) - 1.0).max())
        if worst > atol:
            raise AnalysisError("attention rows do not sum to 1", expected=f"|row sum - 1| <= {atol}",
                                got=f"{worst:.3g}", fix="pass post-softmax probabilities, or validate=False")


def fuse_heads(array: np.ndarray, head_fusion: str = "mean") -> np.ndarray:
    """``[layer, batch, head, q, k] -> [layer, batch, q, k]`` by mean, max or min over heads."""
    if head_fusion not in HEAD_FUSIONS:
        raise AnalysisError("unknown head fusion", expected=f"one of {HEAD_FUSIONS}", got=head_fusion)
    return getattr(np, head_fusion)(array, axis=2)


def _rownorm(a: np.ndarray) -> np.ndarray:
    sums = a.sum(-1, keepdims=True)
    return np.divide(a, sums, out=np.zeros_like(a), where=sums > 0)


def exclude_keys(fused: np.ndarray, tokens: Sequence[int] | None, renormalize: bool = True) -> np.ndarray:
    """Zero the columns of the given key positions (e.g. sink tokens); renormalise rows (all-zero rows stay 0)."""
    if not tokens:
        return fused
    n = fused.shape[-1]
    bad = [t for t in tokens if not -n <= int(t) < n]
    if bad:
        raise AnalysisError("excluded token out of range", expected=f"positions in [-{n}, {n})", got=bad)
    out = fused.copy()
    out[..., [int(t) % n for t in tokens]] = 0.0
    return _rownorm(out) if renormalize else out


def discard_lowest(fused: np.ndarray, ratio: float) -> np.ndarray:
    """Zero the ``floor(ratio * off-diagonal count)`` smallest off-diagonal entries of each layer's matrix.

    As in the jacobgil ViT rollout, entries are dropped from the fused attention before the identity is added, so
    the residual path is never dropped. jacobgil also spares flat index 0 (the [CLS]->[CLS] entry); here the whole
    diagonal is spared. Ties at the threshold are broken by position (a stable sort)."""
    if not 0.0 <= ratio < 1.0:
        raise AnalysisError("discard_ratio out of range", expected="0 <= discard_ratio < 1", got=ratio)
    n_q, n_k = fused.shape[-2:]
    off = ~np.eye(n_q, n_k, dtype=bool)
    count = int(ratio * off.sum())
    if count == 0:
        return fused
    flat = fused.reshape(-1, n_q * n_k).copy()
    cols = np.flatnonzero(off.ravel())
    lowest = np.argsort(flat[:, cols], axis=1, kind="stable")[:, :count]
    np.put_along_axis(flat, cols[lowest], 0.0, axis=1)
    return flat.reshape(fused.shape)


def augment(fused: np.ndarray, residual_weight: float = 0.5) -> np.ndarray:
    """``A_hat = rownorm(residual_weight * I + (1 - residual_weight) * fused)`` for square ``[..., n, n]``."""
    if not 0.0 <= residual_weight <= 1.0:
        raise AnalysisError("residual_weight out of range", expected="0 <= residual_weight <= 1", got=residual_weight)
    n_q, n_k = fused.shape[-2:]
    if n_q != n_k:
        raise AnalysisError("attention is not square", expected="self-attention with query == key length",
                            got=f"{n_q} queries x {n_k} keys", fix="rollout and flow need self-attention sites")
    return _rownorm(residual_weight * np.eye(n_q) + (1.0 - residual_weight) * fused)


def augmented_layers(attn: AttnInput, *, head_fusion: str = "mean", residual_weight: float = 0.5,
                     discard_ratio: float = 0.0, exclude_tokens: Sequence[int] | None = None,
                     renormalize: bool = True, validate: bool = True,
                     atol: float = 1e-3) -> tuple[np.ndarray, InputKind]:
    """``A_hat`` per layer, ``[layer, batch, n, n]`` float64, and the input kind (shared by rollout and flow)."""
    array, info = layer_stack(attn, validate=validate, atol=atol)
    fused = exclude_keys(fuse_heads(array, head_fusion), exclude_tokens, renormalize)
    return augment(discard_lowest(fused, discard_ratio), residual_weight), info


def read_rows(joint: np.ndarray, readout: int | str | None) -> np.ndarray:
    """Pick one query row (``int``, e.g. 0 for [CLS], -1 for the last token) or reduce rows (``mean``/``max``)."""
    if readout is None:
        return joint
    n = joint.shape[-2]
    if isinstance(readout, str):
        if readout not in ROW_READOUTS:
            raise AnalysisError("unknown readout", expected=f"None, a row index or one of {ROW_READOUTS}", got=readout)
        return getattr(np, readout)(joint, axis=-2)
    if isinstance(readout, bool) or not isinstance(readout, (int, np.integer)) or not -n <= int(readout) < n:
        raise AnalysisError("readout row out of range", expected=f"an int in [-{n}, {n})", got=readout)
    return joint[..., int(readout), :]


def rollout(attn: AttnInput, *, head_fusion: str = "mean", residual_weight: float = 0.5, discard_ratio: float = 0.0,
            start_layer: int = 0, readout: int | str | None = None, exclude_tokens: Sequence[int] | None = None,
            renormalize: bool = True, validate: bool = True, atol: float = 1e-3,
            ) -> Float[Array, "layer query key"] | Float[Array, "layer batch query key"] | Float[Array, "layer key"] \
        | Float[Array, "layer batch key"]:
    """Joint attention of every layer, ``[layer, (batch,) query, key]`` (``[layer, (batch,) key]`` with a readout).

    attn: an ``AttentionTrace`` (its text self-attention stack) or probabilities ``[layer, head, query, key]`` /
        ``[layer, batch, head, query, key]``, torch or numpy; the result is of the same kind, dtype and device.
    head_fusion: ``mean`` (the paper), ``max`` or ``min`` over heads.
    residual_weight: weight of the identity in ``A_hat``; 0.5 is the paper's ``(A + I) / 2``.
    discard_ratio: fraction of each layer's smallest off-diagonal fused entries set to 0 (see ``discard_lowest``).
    start_layer: rollout starts there; the layers before it are returned as the identity (nothing mixed yet).
    readout: ``None`` (all rows), a row index (0 for [CLS], -1 for a causal LM's last token), ``mean`` or ``max``.
    exclude_tokens: key positions (e.g. sink tokens) whose columns are zeroed in every layer's fused attention
        before the residual is added, rows then renormalised when ``renormalize``. Other tokens then attribute
        nothing to them; an excluded token keeps only its own residual path.
    validate: require rows of ``attn`` to sum to 1 within ``atol``.

    Example:
        >>> import numpy as np
        >>> attn = np.full((2, 1, 3, 3), 1 / 3)                    # uniform attention, 2 layers, 1 head
        >>> rollout(attn, readout=0)[-1].round(3)                 # the residual keeps token 0 ahead
        array([0.5 , 0.25, 0.25])
    """
    a_hat, info = augmented_layers(attn, head_fusion=head_fusion, residual_weight=residual_weight,
                                   discard_ratio=discard_ratio, exclude_tokens=exclude_tokens,
                                   renormalize=renormalize, validate=validate, atol=atol)
    n_layers = a_hat.shape[0]
    if not -n_layers <= start_layer < n_layers:
        raise AnalysisError("start_layer out of range", expected=f"an int in [-{n_layers}, {n_layers})",
                            got=start_layer)
    start = start_layer % n_layers
    joint = np.empty_like(a_hat)
    joint[:start] = np.eye(a_hat.shape[-1])
    joint[start] = a_hat[start]
    for layer in range(start + 1, n_layers):
        joint[layer] = a_hat[layer] @ joint[layer - 1]
    return info.wrap(read_rows(joint, readout))
