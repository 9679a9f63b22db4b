"""``recall-llama``: a 2-layer Llama (RoPE, GQA 4 query / 2 KV heads) trained on multi-query associative recall.

Ground truth: retrieval heads (Wu et al. 2024 rule): from each query-key position, the head's top-1 attention lands
on the value token paired with that key, and that value is what the model then predicts; score = such copies /
queries answered correctly. Value-to-key heads in layer 0 bind each value to its key (attention from a value to the
key just before it). Confirmed by zero-ablation: MQAR accuracy collapses with them ablated, not with as many random
other heads.

A group-lasso penalty on each head's weights (ramped in after the task is learned) switches redundant heads off;
heads left with < 5% of the largest output norm are then zeroed exactly (outputs 0, attention uniform). Without
it every layer-1 head becomes a (redundant) retrieval head.
"""

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from ..datasets import PromptSuite, associative_recall
from ._analysis import ablation_studies, attention_patterns
from ._card import write_card
from ._common import (architecture_fields, curve_logger, fit_analyse_save, head_name, pruned_head_names, scores_table,
                      seed_everything, step_seed, torch_threads, train_loop, with_head_lasso)
from ._meta import base_card, describe

SPEC = {"name": "recall-llama", "task": "multi-query associative recall (MQAR): predict the value of each queried key",
        "architecture": "LlamaForCausalLM", "auto_class": "AutoModelForCausalLM"}
SPEC["description"] = describe(__doc__)
SEED = 0
STEPS = 1500
HELDOUT_SEED = 1_000_002
PAD, BOS = 0, 1
HP: dict[str, Any] = {"vocab_size": 128, "d_model": 64, "n_heads": 4, "n_kv_heads": 2, "n_layers": 2,
                      "d_mlp": 128, "max_positions": 64, "batch_size": 32, "lr": 2e-3, "warmup": 100,
                      "init_std": 0.05, "min_pairs": 2, "n_pairs": 8, "key_range": [2, 65], "value_range": [65, 128],
                      "head_lasso": 0.05, "qk_lasso": 1.0,
                      "lasso_ramp": [0.1, 0.4]}
THRESHOLD = 0.5


def config() -> LlamaConfig:
    return LlamaConfig(vocab_size=HP["vocab_size"], hidden_size=HP["d_model"], intermediate_size=HP["d_mlp"],
                       num_hidden_layers=HP["n_layers"], num_attention_heads=HP["n_heads"],
                       num_key_value_heads=HP["n_kv_heads"], head_dim=HP["d_model"] // HP["n_heads"],
                       max_position_embeddings=HP["max_positions"], initializer_range=HP["init_std"],
                       pad_token_id=PAD, bos_token_id=BOS, eos_token_id=None, tie_word_embeddings=False)


def build_model(seed: int = SEED) -> LlamaForCausalLM:
    seed_everything(seed)
    model = LlamaForCausalLM(config())
    model.set_attn_implementation("eager")
    return model


def make_suite(n_items: int, seed: int) -> PromptSuite:
    return associative_recall(n_items, n_pairs=HP["n_pairs"], min_pairs=HP["min_pairs"],
                              vocab_size=HP["vocab_size"], seed=seed, key_range=HP["key_range"],
                              value_range=HP["value_range"], bos_id=BOS, name="recall-llama")


def tensors(suite: PromptSuite) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full sequences (prompt + last answer) right-padded, their mask, and ``query [batch, seq]`` positions."""
    seqs = [item.ids + item.answer_ids for item in suite.items]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    query = torch.zeros_like(ids, dtype=torch.bool)
    for row, (seq, item) in enumerate(zip(seqs, suite.items)):
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
        for q in item.metadata["queries"]:
            query[row, q["position"]] = True
    return ids, mask, query


def _logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask).logits


def recall_loss(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    logits = _logits(model, ids, mask)[:, :-1]
    sel = query[:, :-1]
    return F.cross_entropy(logits[sel], ids[:, 1:][sel])


@torch.no_grad()
def recall_accuracy(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, query: torch.Tensor) -> float:
    """Top-1 accuracy of the value predicted at every query position (teacher forced)."""
    logits = _logits(model, ids, mask)[:, :-1]
    sel = query[:, :-1]
    return float((logits.argmax(-1)[sel] == ids[:, 1:][sel]).float().mean())


@torch.no_grad()
def head_scores(model: torch.nn.Module, suite: PromptSuite) -> dict[str, torch.Tensor]:
    """``retrieval``: Wu et al. copy rule at query positions; ``value_to_key``: attention from a value to its key."""
    ids, mask, _ = tensors(suite)
    attn = attention_patterns(model, ids, mask)  # [layer, batch, head, query, key]
    pred = _logits(model, ids, mask).argmax(-1)
    n_layers, _, n_heads = attn.shape[:3]
    copies = torch.zeros(n_layers, n_heads)
    bind = torch.zeros(n_layers, n_heads)
    n_correct = n_values = 0
    for b, item in enumerate(suite.items):
        for q in item.metadata["queries"]:
            if int(pred[b, q["position"]]) != q["answer"]:
                continue
            n_correct += 1
            top = attn[:, b, :, q["position"]].argmax(-1)  # [layer, head]
            copies += ((top == q["value_position"]) & (ids[b, top] == q["answer"])).float()
        start, end = item.metadata["kv_span"]
        vals = torch.arange(start + 1, end, 2)
        bind += attn[:, b][:, :, vals, vals - 1].sum(-1)
        n_values += len(vals)
    return {"retrieval": copies / max(1, n_correct), "value_to_key": bind / max(1, n_values)}


def analyze(model: torch.nn.Module, n_items: int = 256, seed: int = HELDOUT_SEED) -> dict[str, Any]:
    suite = make_suite(n_items, seed)
    ids, mask, query = tensors(suite)
    acc = recall_accuracy(model, ids, mask, query)
    scores = head_scores(model, suite)
    ret = scores["retrieval"]
    key = [(int(l), int(h)) for l, h in torch.nonzero(ret >= THRESHOLD)] or [
        divmod(int(ret.argmax()), ret.shape[1])]
    bind = scores["value_to_key"][0]
    binders = [(0, int(h)) for h in torch.nonzero(bind >= THRESHOLD).flatten()]
    all_heads = [(l, h) for l in range(HP["n_layers"]) for h in range(HP["n_heads"])]
    chance = round(1 / (HP["value_range"][1] - HP["value_range"][0]), 4)
    heads = {"retrieval": key, "value_to_key": binders}
    studies = ablation_studies(model, heads, all_heads, lambda m: recall_accuracy(m, ids, mask, query),
                               metric_name="MQAR accuracy over all queries", chance=chance, seed=seed)
    gt = {role: [head_name(*h) for h in hs] for role, hs in heads.items()}
    return {"accuracy": acc, "n_items": n_items, "seed": seed, "chance": chance,
            "scores": {k: scores_table(v) for k, v in scores.items()}, "ground_truth": gt, "ablation": studies}


def fit(seed: int = SEED, steps: int = STEPS) -> tuple[LlamaForCausalLM, dict[str, Any]]:
    with torch_threads(1):
        model = build_model(seed)
        probe = tensors(make_suite(128, HELDOUT_SEED + 1))
        curve: list[list[float]] = []

        def loss_fn(m: torch.nn.Module, step: int) -> torch.Tensor:
            loss = recall_loss(m, *tensors(make_suite(HP["batch_size"], step_seed(seed, step))))
            return with_head_lasso(loss, m, step, steps, HP)

        log = train_loop(model, loss_fn, steps=steps, lr=HP["lr"], warmup=HP["warmup"], desc="recall-llama",
                         log_every=100, on_log=curve_logger(model, lambda: [recall_accuracy(model, *probe)], curve))
    log["accuracy_curve"] = curve
    log["pruned_heads"] = pruned_head_names(model, HP)
    return model, log


def train(out_dir: str | Path, seed: int = SEED, steps: int = STEPS) -> Path:
    model, log, result, out = fit_analyse_save(fit, analyze, seed, steps, out_dir)
    card = base_card(SPEC, model, seed, log, HP,
                     data={"generator": "associative_recall", "params": make_suite(1, 0).params})
    card["architecture"].update(architecture_fields(HP, HP["max_positions"], n_kv_heads=HP["n_kv_heads"],
                                                    positions="RoPE", mlp="SwiGLU"))
    card["training"]["accuracy_curve [step, acc]"] = log["accuracy_curve"]
    card["evaluation"] = {"metric": "MQAR top-1 accuracy over all queries (teacher forced)",
                          "value": round(result["accuracy"], 4), "n_items": result["n_items"],
                          "seed": result["seed"], "chance": result["chance"]}
    card["ground_truth_heads"] = result["ground_truth"]
    card["ground_truth_rules"] = {
        "retrieval": f"retrieval score (top-1 attention from the query on the value it then predicts) >= {THRESHOLD}",
        "value_to_key": f"layer-0 heads whose mean attention from each value to its key is >= {THRESHOLD}"}
    card["head_scores"] = result["scores"]
    card["ablation"] = result["ablation"]
    card["notes"] = ["Head indices are query heads; under GQA query heads 2k and 2k+1 share KV head k."]
    write_card(out, card)
    return out
