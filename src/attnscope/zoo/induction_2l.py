"""``induction-2l``: a 2-layer attention-only GPT-2 trained on repeated random tokens, period random per item.

Ground truth: a previous-token head in layer 0 (attention from t to t-1) and an induction head in layer 1
(attention from t to the tokens that followed earlier occurrences of token t), found by their attention scores and
confirmed by zero-ablation (repeat accuracy collapses with them ablated, not with as many random other heads).

Training choices that make this work on a CPU budget and keep the ground truth crisp: the MLPs are zeroed and
frozen (attention-only); position embeddings start from the sin/cos table (from random init the previous-token
head rarely forms in minutes) and attention logits are unscaled (``scale_attn_weights=False``); a group-lasso
penalty on each head's weights (ramped in after the phase change) switches redundant heads off, and heads left
with < 5% of the largest output norm are then zeroed exactly (outputs 0, attention uniform).
"""

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from ..datasets import PromptSuite, induction
from ._analysis import ablation_studies, attention_patterns
from ._card import write_card
from ._common import (architecture_fields, curve_logger, fit_analyse_save, head_name, pruned_head_names, scores_table,
                      seed_everything, step_seed, torch_threads, train_loop, with_head_lasso)
from ._meta import base_card, describe

SPEC = {"name": "induction-2l", "task": "next-token prediction on repeated random tokens (period random per item)",
        "architecture": "GPT2LMHeadModel", "auto_class": "AutoModelForCausalLM"}
SPEC["description"] = describe(__doc__)
SEED = 0
STEPS = 4000
HELDOUT_SEED = 1_000_001
HP: dict[str, Any] = {"vocab_size": 128, "seq_len": 32, "d_model": 64, "n_heads": 4, "n_layers": 2,
                      "batch_size": 32, "lr": 1e-3, "warmup": 100, "init_std": 0.05, "min_period": 4,
                      "max_period": 12, "attention_only": True, "d_mlp": 4, "head_lasso": 0.05, "qk_lasso": 0.02,
                      "pos_init": "sinusoidal", "pos_scale": 0.1, "scale_attn_weights": False,
                      "lasso_ramp": [0.1, 0.4]}
THRESHOLDS = {"previous_token": 0.3, "induction": 0.5}


def config() -> GPT2Config:
    return GPT2Config(vocab_size=HP["vocab_size"], n_positions=HP["seq_len"], n_embd=HP["d_model"],
                      n_layer=HP["n_layers"], n_head=HP["n_heads"], resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0, initializer_range=HP["init_std"], bos_token_id=None, eos_token_id=None,
                      pad_token_id=None, tie_word_embeddings=True,
                      n_inner=HP["d_mlp"] if HP["attention_only"] else None,
                      scale_attn_weights=HP.get("scale_attn_weights", True))


def sinusoidal_positions(n_positions: int, d_model: int) -> torch.Tensor:
    """The Transformer's sin/cos table ``[position, d_model]``: a shift by one position is one fixed rotation, so
    a previous-token head is a single bilinear form (learned absolute positions from random init rarely get there
    on CPU budgets)."""
    pos = torch.arange(n_positions, dtype=torch.float32)[:, None]
    freq = 10000 ** (-torch.arange(0, d_model, 2, dtype=torch.float32) / d_model)
    table = torch.zeros(n_positions, d_model)
    table[:, 0::2], table[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    return table


def build_model(seed: int = SEED) -> GPT2LMHeadModel:
    """A fresh model; with ``attention_only`` its MLPs are zeroed and frozen (they output exactly 0)."""
    seed_everything(seed)
    model = GPT2LMHeadModel(config())
    model.set_attn_implementation("eager")
    if HP.get("pos_init") == "sinusoidal":
        with torch.no_grad():
            model.transformer.wpe.weight.copy_(sinusoidal_positions(HP["seq_len"], HP["d_model"]) * HP["pos_scale"])
    if HP["attention_only"]:
        for block in model.transformer.h:
            for param in block.mlp.parameters():
                param.data.zero_()
                param.requires_grad_(False)
    return model


def make_suite(n_items: int, seed: int) -> PromptSuite:
    return induction(n_items, seq_len=HP["seq_len"], vocab_size=HP["vocab_size"], seed=seed,
                     min_period=HP["min_period"], max_period=HP["max_period"], name="induction-2l")


def tensors(suite: PromptSuite) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids [batch, seq]`` and ``target [batch, seq]``: True where ``ids[t]`` is predictable by induction."""
    ids = torch.tensor([item.ids for item in suite.items])
    target = torch.zeros_like(ids, dtype=torch.bool)
    for row, item in enumerate(suite.items):
        start, end = item.metadata["repeat_span"]
        target[row, start + 1:end] = True
    return ids, target


@torch.no_grad()
def repeat_metrics(model: torch.nn.Module, ids: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """(top-1 accuracy, mean loss) of next-token prediction on the predictable repeated positions."""
    logits = model(ids).logits[:, :-1]
    mask, tgt = target[:, 1:], ids[:, 1:]
    acc = (logits.argmax(-1) == tgt)[mask].float().mean()
    loss = F.cross_entropy(logits[mask], tgt[mask])
    return float(acc), float(loss)


def head_scores(model: torch.nn.Module, suite: PromptSuite) -> dict[str, torch.Tensor]:
    """``previous_token``: mean attention from t to t-1 (t >= 1); ``induction``: mean attention mass from each
    query t in the repeat span onto the tokens that followed earlier occurrences of token t (one of them is
    t - period + 1; with several repeats the mass may spread over all of them)."""
    ids, _ = tensors(suite)
    attn = attention_patterns(model, ids)  # [layer, batch, head, query, key]
    seq = ids.shape[1]
    q = torch.arange(1, seq)
    prev = attn[:, :, :, q, q - 1].mean(dim=(1, 3))
    # targets[b, t, s] = True when s <= t, s >= 1 and ids[s - 1] == ids[t] with s - 1 < t
    same = ids[:, :, None] == ids[:, None, :]  # [batch, t, s-1]
    targets = torch.zeros_like(same)
    targets[:, :, 1:] = same[:, :, :-1]
    targets &= torch.ones(seq, seq, dtype=torch.bool).tril()[None]
    rows = torch.zeros(ids.shape, dtype=torch.bool)
    for b, item in enumerate(suite.items):
        start, end = item.metadata["repeat_span"]
        rows[b, start:end] = True
    mass = (attn * targets[None, :, None]).sum(-1)  # [layer, batch, head, query]
    ind = (mass * rows[None, :, None]).sum(dim=(1, 3)) / rows.sum()
    return {"previous_token": prev, "induction": ind}


def _select(scores: torch.Tensor, layer: int, threshold: float) -> list[tuple[int, int]]:
    row = scores[layer]
    heads = [(layer, int(h)) for h in torch.nonzero(row >= threshold).flatten()]
    return heads or [(layer, int(row.argmax()))]


def analyze(model: torch.nn.Module, n_items: int = 256, seed: int = HELDOUT_SEED) -> dict[str, Any]:
    """Held-out accuracy, head scores, ground-truth heads and the key-vs-random ablation."""
    suite = make_suite(n_items, seed)
    ids, target = tensors(suite)
    acc, loss = repeat_metrics(model, ids, target)
    scores = head_scores(model, suite)
    gt = {role: _select(scores[role], layer, THRESHOLDS[role])
          for role, layer in (("previous_token", 0), ("induction", 1))}
    all_heads = [(l, h) for l in range(HP["n_layers"]) for h in range(HP["n_heads"])]
    studies = ablation_studies(model, gt, all_heads, lambda m: repeat_metrics(m, ids, target)[0],
                               metric_name="top-1 accuracy on the predictable repeated positions",
                               chance=round(1 / HP["vocab_size"], 4), seed=seed)
    return {"accuracy": acc, "repeat_loss": loss, "n_items": n_items, "seed": seed,
            "scores": {k: scores_table(v) for k, v in scores.items()},
            "ground_truth": {k: [head_name(*h) for h in v] for k, v in gt.items()}, "ablation": studies}


def fit(seed: int = SEED, steps: int = STEPS, eval_every: int = 100) -> tuple[GPT2LMHeadModel, dict[str, Any]]:
    """Train from ``seed``; returns the model and the training log (with the held-out repeat-loss curve)."""
    with torch_threads(1):
        model = build_model(seed)
        probe_ids, probe_target = tensors(make_suite(128, HELDOUT_SEED + 1))
        curve: list[list[float]] = []

        def loss_fn(m: torch.nn.Module, step: int) -> torch.Tensor:
            ids, _ = tensors(make_suite(HP["batch_size"], step_seed(seed, step)))
            return with_head_lasso(m(ids, labels=ids).loss, m, step, steps, HP)

        def measure() -> list[float]:
            acc, loss = repeat_metrics(model, probe_ids, probe_target)
            return [loss, acc]

        log = train_loop(model, loss_fn, steps=steps, lr=HP["lr"], warmup=HP["warmup"], desc="induction-2l",
                         log_every=eval_every, on_log=curve_logger(model, measure, curve))
    log["repeat_curve"] = curve
    log["pruned_heads"] = pruned_head_names(model, HP)
    hits = [step for step, _, acc in curve if acc >= 0.5]
    log["phase_change_step"] = hits[0] if hits else None
    return model, log


def train(out_dir: str | Path, seed: int = SEED, steps: int = STEPS) -> Path:
    """Train from ``seed``, analyse, and write the checkpoint and card to ``out_dir``."""
    model, log, result, out = fit_analyse_save(fit, analyze, seed, steps, out_dir)
    card = base_card(SPEC, model, seed, log, HP, data={"generator": "induction", "params": make_suite(1, 0).params})
    mlp = (f"none (attention-only: MLP weights of width {HP['d_mlp']} zeroed and frozen)" if HP["attention_only"]
           else "standard GPT-2 MLP (4 x d_model)")
    card["architecture"].update(architecture_fields(HP, HP["seq_len"], mlp=mlp))
    card["training"].update({"phase_change_step": log["phase_change_step"],
                             "repeat_curve [step, loss, acc]": log["repeat_curve"]})
    card["evaluation"] = {"metric": "top-1 next-token accuracy on the predictable repeated positions",
                          "value": round(result["accuracy"], 4), "repeat_loss": round(result["repeat_loss"], 4),
                          "n_items": result["n_items"], "seed": result["seed"],
                          "chance": round(1 / HP["vocab_size"], 4)}
    card["ground_truth_heads"] = result["ground_truth"]
    card["ground_truth_rules"] = {
        "previous_token": f"layer-0 heads with mean attention from t to t-1 >= {THRESHOLDS['previous_token']}",
        "induction": f"layer-1 heads whose mean attention mass from the repeat span onto tokens that followed "
                     f"earlier occurrences of the current token is >= {THRESHOLDS['induction']}"}
    card["head_scores"] = result["scores"]
    card["ablation"] = result["ablation"]
    write_card(out, card)
    return out
