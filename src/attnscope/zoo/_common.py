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


def parse_head(name: str) -> tuple[int, int]:
    layer, head = name[1:].split("H")
    return int(layer), int(head)


def scores_table(scores: torch.Tensor) -> dict[str, float]:
    """``[layer, head]`` scores as ``{"L0H0": 0.12, ...}`` rounded to 4 places."""
    return {head_name(l, h): round(float(scores[l, h]), 4) for l in range(scores.shape[0])
            for h in range(scores.shape[1])}
