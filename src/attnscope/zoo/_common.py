"""Shared training plumbing for the organisms: seeding, thread limits, schedules, progress bars, saving."""

import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..probes.head_slices import output_projections

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads (None: leave as is); the old value is restored after."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def cosine_lr(step: int, steps: int, warmup: int, floor: float = 0.1) -> float:
    """Multiplier: linear warm-up over ``warmup`` steps, then cosine decay to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def step_seed(seed: int, step: int) -> int:
    """The data seed of one training step (distinct from every held-out seed, which are < 2**31)."""
    return 2**31 + seed * 1_000_003 + step


def train_loop(model: nn.Module, loss_fn: Callable[[nn.Module, int], torch.Tensor], *, steps: int, lr: float,
               warmup: int, weight_decay: float = 0.0, clip: float = 1.0, desc: str = "train",
               log_every: int = 50, on_log: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """AdamW + warm-up/cosine; ``loss_fn(model, step)`` builds the step's batch and returns its loss.

    Returns ``{"steps", "time_s", "final_loss", "loss_curve": [[step, loss], ...]}``.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, warmup))
    curve: list[list[float]] = []
    running = None
    start = time.perf_counter()
    model.train()
    bar = tqdm(range(steps), desc=desc, leave=False, mininterval=1.0)
    for step in bar:
        loss = loss_fn(model, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        value = float(loss.detach())
        running = value if running is None else 0.95 * running + 0.05 * value
        if step % log_every == 0 or step == steps - 1:
            curve.append([step, round(value, 4)])
            bar.set_postfix(loss=f"{running:.3f}")
            if on_log is not None:
                on_log(step, value)
    model.eval()
    return {"steps": steps, "time_s": round(time.perf_counter() - start, 1), "final_loss": round(running or 0, 4),
            "loss_curve": curve}


def curve_logger(model: nn.Module, measure: Callable[[], list[float]], curve: list[list[float]]):
    """A ``train_loop`` ``on_log`` appending ``[step, *measure()]`` (rounded) to ``curve``, measured in eval mode."""
    def on_log(step: int, _: float) -> None:
        model.eval()
        curve.append([step, *(round(float(v), 4) for v in measure())])
        model.train()
    return on_log


def fit_analyse_save(fit: Callable[[int, int], tuple[nn.Module, dict]], analyze: Callable[[nn.Module], dict],
                     seed: int, steps: int, out_dir: "str | Path") -> tuple[nn.Module, dict, dict, Path]:
    """The first half of every organism's ``train``: fit from ``seed``, analyse on one thread, save the weights."""
    model, log = fit(seed, steps)
    with torch_threads(1):
        result = analyze(model)
    return model, log, result, save_checkpoint(model, Path(out_dir))


def save_checkpoint(model: nn.Module, out_dir: Path) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (HF format) into ``out_dir``; returns it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def n_params(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def head_name(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def scores_table(scores: torch.Tensor) -> dict[str, float]:
    """``[layer, head]`` scores as ``{"L0H0": 0.12, ...}`` rounded to 4 places."""
    return {head_name(l, h): round(float(scores[l, h]), 4) for l in range(scores.shape[0])
            for h in range(scores.shape[1])}


def head_output_norms(model: nn.Module) -> list[torch.Tensor]:
    """Per layer, the Frobenius norm of each head's slice of the attention output projection ``[head]``."""
    norms = []
    for proj in output_projections(model):
        weight = proj.module.weight
        # nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out]: put the per-head input dim first
        w_in = weight.t() if isinstance(proj.module, nn.Linear) else weight
        norms.append(w_in.reshape(proj.n_heads, proj.d_head * w_in.shape[1]).norm(dim=1))
    return norms


def _per_head(weight: torch.Tensor, n: int, out_first: bool) -> torch.Tensor:
    """Rows of ``[n, -1]``: head i's slice of a q/k/v weight whose head axis is the output dim."""
    w = weight if out_first else weight.t()  # -> [n * d_head, d_in]
    return w.reshape(n, -1)


def _head_groups(proj: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-head weight groups of one attention layer as ``[groups, -1]`` tensors: (value/output, query/key).

    GPT-2 and BERT: one group per head. Llama class with GQA: query and output slices per query head, key and
    value slices per KV head.
    """
    att, h = proj.block, proj.n_heads
    o = proj.module.weight
    o_rows = (o.t() if isinstance(proj.module, nn.Linear) else o).reshape(h, -1)
    if hasattr(att, "c_attn"):  # GPT-2 Conv1D [d_in, 3 * d]
        q, k, v = (_per_head(w, h, False) for w in att.c_attn.weight.split(att.c_attn.weight.shape[1] // 3, 1))
        return [torch.cat([v, o_rows], dim=1)], [torch.cat([q, k], dim=1)]
    if hasattr(att, "q_proj"):  # Llama class
        n_kv = att.k_proj.weight.shape[0] // proj.d_head
        ov = [o_rows, _per_head(att.v_proj.weight, n_kv, True)]
        return ov, [_per_head(att.q_proj.weight, h, True), _per_head(att.k_proj.weight, n_kv, True)]
    inner = att.self  # BERT
    q, k, v = (_per_head(m.weight, h, True) for m in (inner.query, inner.key, inner.value))
    return [torch.cat([v, o_rows], dim=1)], [torch.cat([q, k], dim=1)]


def head_group_lasso(model: nn.Module, qk_weight: float = 0.1) -> torch.Tensor:
    """Group lasso over heads: sum of the norms of each head's value/output weights, plus ``qk_weight`` times the
    norms of its query/key weights. It switches unneeded heads off (their attention patterns fade to uniform too),
    so an organism's circuit uses few heads and its ground truth is crisp; the small query/key weight keeps the
    patterns of the heads in use sharp."""
    total = torch.zeros(())
    for proj in output_projections(model):
        ov, qk = _head_groups(proj)
        total = total + sum(g.norm(dim=1).sum() for g in ov) + qk_weight * sum(g.norm(dim=1).sum() for g in qk)
    return total


def ramp(step: int, steps: int, start: float = 0.1, full: float = 0.4) -> float:
    """0 before ``start * steps``, then linear up to 1 at ``full * steps`` (a regulariser's weight)."""
    lo, hi = start * steps, max(full * steps, start * steps + 1)
    return float(min(1.0, max(0.0, (step - lo) / (hi - lo))))


@torch.no_grad()
def prune_dead_heads(model: nn.Module, rel_threshold: float = 0.05) -> list[tuple[int, int]]:
    """Zero every weight of heads the group lasso switched off (output-slice norm < ``rel_threshold`` x the largest
    head's), so their outputs are exactly 0 and their attention exactly uniform. Returns the pruned heads.

    Under GQA a KV head's key/value weights are zeroed only when all its query heads are pruned.
    """
    projections = output_projections(model)
    norms = head_output_norms(model)
    top = max(float(n.max()) for n in norms)
    pruned = []
    for proj, layer_norms in zip(projections, norms):
        dead = [h for h in range(proj.n_heads) if float(layer_norms[h]) < rel_threshold * top]
        block, d = proj.block, proj.d_head
        for h in dead:
            rows = slice(h * d, (h + 1) * d)
            if isinstance(proj.module, nn.Linear):  # [out, in]: the head is a column block
                proj.module.weight[:, rows] = 0.0
            else:  # GPT-2 Conv1D [in, out]: a row block
                proj.module.weight[rows] = 0.0
            if hasattr(block, "c_attn"):  # GPT-2: c_attn out columns [q | k | v]
                width = block.c_attn.weight.shape[1] // 3
                for part in range(3):
                    cols = slice(part * width + h * d, part * width + (h + 1) * d)
                    block.c_attn.weight[:, cols] = 0.0
                    block.c_attn.bias[cols] = 0.0
            else:
                q = block.q_proj if hasattr(block, "q_proj") else block.self.query
                q.weight[rows] = 0.0
                if q.bias is not None:
                    q.bias[rows] = 0.0
                if not hasattr(block, "q_proj"):  # BERT: key/value per head
                    for m in (block.self.key, block.self.value):
                        m.weight[rows] = 0.0
                        m.bias[rows] = 0.0
            pruned.append((proj.layer, h))
        if hasattr(block, "q_proj"):
            group = proj.group_size
            for kv in range(proj.n_kv_heads):
                if all(q in dead for q in range(kv * group, (kv + 1) * group)):
                    for m in (block.k_proj, block.v_proj):
                        m.weight[kv * d:(kv + 1) * d] = 0.0
                        if m.bias is not None:
                            m.bias[kv * d:(kv + 1) * d] = 0.0
    return pruned


def with_head_lasso(loss: torch.Tensor, model: nn.Module, step: int, steps: int, hp: dict) -> torch.Tensor:
    """``loss`` plus the ramped head group-lasso penalty of ``hp`` (none when ``hp["head_lasso"]`` is 0)."""
    if not hp.get("head_lasso"):
        return loss
    return loss + hp["head_lasso"] * ramp(step, steps, *hp["lasso_ramp"]) * head_group_lasso(model, hp["qk_lasso"])


def pruned_head_names(model: nn.Module, hp: dict) -> list[str]:
    """Zero the heads the lasso switched off (when it was used) and name them for the card."""
    return [head_name(*h) for h in prune_dead_heads(model)] if hp.get("head_lasso") else []


def architecture_fields(hp: dict, max_positions: int, **extra: Any) -> dict:
    """The card's shared architecture entries (layers, heads, sizes) plus organism-specific ``extra``."""
    return {"n_layers": hp["n_layers"], "n_heads": hp["n_heads"], "d_model": hp["d_model"],
            "d_head": hp["d_model"] // hp["n_heads"], "vocab_size": hp["vocab_size"],
            "max_positions": max_positions, **extra}
