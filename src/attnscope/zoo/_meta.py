"""The fields every organism card shares: identity, architecture class and size, seed, training provenance."""

import platform
from typing import Any

import torch
import transformers

from ._common import n_params


def describe(doc: str | None) -> str:
    """A module docstring as card text: paragraphs kept, line breaks inside them joined."""
    return "\n\n".join(" ".join(par.split()) for par in (doc or "").strip().split("\n\n"))


def base_card(spec: dict[str, Any], model: torch.nn.Module, seed: int, log: dict[str, Any], hp: dict[str, Any],
              data: dict[str, Any]) -> dict[str, Any]:
    data = {"generator": data["generator"], "params": {k: v for k, v in data["params"].items() if k != "n_items"}}
    return {
        "name": spec["name"],
        "description": spec.get("description", spec["task"]),
        "task": spec["task"],
        "auto_class": spec["auto_class"],
        "architecture": {"class": spec["architecture"], "parameters": n_params(model)},
        "data": data,
        "seed": int(seed),
        "training": {"steps": log["steps"], "batch_size": hp["batch_size"], "lr": hp["lr"],
                     "warmup": hp.get("warmup"), "optimizer": "AdamW(betas=(0.9, 0.98), weight_decay=0)",
                     "schedule": "linear warm-up, cosine decay to 0.1 x lr", "grad_clip": 1.0,
                     "time_s": log["time_s"], "device": "cpu", "threads": 1, "final_loss": log["final_loss"],
                     "hyperparameters": hp, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version(), "loss_curve": log["loss_curve"],
                     "pruned_heads": log.get("pruned_heads", []),
                     "pruning": "heads switched off by the group-lasso penalty (output-slice norm < 5% of the "
                                "largest) get all their q/k/v/o weights set to 0 after training: outputs exactly "
                                "0, attention exactly uniform" if log.get("pruned_heads") else None},
    }
