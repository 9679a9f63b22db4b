"""``sink-lm``: a 2-layer attention-only GPT-2 trained on Bigram-Backcopy (Guo et al. 2024); grows a BOS sink.

The next token follows a fixed bigram chain, except after a trigger token, where the token before the trigger is
copied. The copy needs attention only at triggers; elsewhere a copying head must output nothing, and the only
token whose value can be (and becomes) a no-op is BOS at position 0: the heads park their attention there
(active-dormant heads). The MLPs are zeroed and frozen (attention-only), so nothing downstream can gate a head's
output instead; with MLPs, or with lasso-pruned heads, no strong sink formed within a CPU budget.

Ground truth: sink heads (mean attention mass on position 0 over non-trigger queries >= 0.3, as in Gu et al.) and
the active-dormant back-copy heads (attention from a trigger to t-1 >= 0.5). Confirmed by zero-ablation
(back-copy accuracy collapses with the back-copy heads ablated, not with random others) and by hiding the BOS key
from every query (the sink is gone; the dormant heads then disturb the bigram predictions).
"""

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from ..datasets import PromptSuite, bigram_backcopy, bigram_transitions
from ._analysis import ablation_studies, attention_patterns
from ._card import write_card
from ._common import (architecture_fields, curve_logger, fit_analyse_save, head_name, scores_table,
                      seed_everything, step_seed, torch_threads, train_loop)
from ._meta import base_card, describe

SPEC = {"name": "sink-lm", "task": "Bigram-Backcopy next-token prediction (Guo et al. 2024); grows a BOS sink",
        "architecture": "GPT2LMHeadModel", "auto_class": "AutoModelForCausalLM"}
SPEC["description"] = describe(__doc__)
SEED = 0
STEPS = 3000
HELDOUT_SEED = 1_000_003
HP: dict[str, Any] = {"family": "gpt2", "vocab_size": 64, "seq_len": 32, "d_model": 64, "n_heads": 4,
                      "n_layers": 2, "d_mlp": 256, "attention_only": True, "tie_embeddings": False,
                      "scale_attn_weights": False, "batch_size": 32, "lr": 3e-3, "warmup": 100,
                      "weight_decay": 0.1, "init_std": 0.05, "n_triggers": 3, "chain_seed": 0, "alpha": 0.05,
                      "trigger_rate": 0.2}
SINK_THRESHOLD = 0.3
COPY_THRESHOLD = 0.6


def config() -> LlamaConfig | GPT2Config:
    if HP.get("family") == "gpt2":
        return GPT2Config(vocab_size=HP["vocab_size"], n_positions=HP["seq_len"], n_embd=HP["d_model"],
                          n_layer=HP["n_layers"], n_head=HP["n_heads"],
                          n_inner=4 if HP.get("attention_only") else HP["d_mlp"], resid_pdrop=0.0,
                          tie_word_embeddings=HP.get("tie_embeddings", True),
                          embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=HP["init_std"], bos_token_id=0,
                          eos_token_id=None, pad_token_id=None, scale_attn_weights=HP.get("scale_attn_weights", True))
    return LlamaConfig(vocab_size=HP["vocab_size"], hidden_size=HP["d_model"],
                       intermediate_size=4 if HP.get("attention_only") else HP["d_mlp"],
                       num_hidden_layers=HP["n_layers"], num_attention_heads=HP["n_heads"],
                       num_key_value_heads=HP["n_heads"], head_dim=HP["d_model"] // HP["n_heads"],
                       max_position_embeddings=HP["seq_len"], initializer_range=HP["init_std"],
                       bos_token_id=0, pad_token_id=None, eos_token_id=None, tie_word_embeddings=False)


def build_model(seed: int = SEED) -> LlamaForCausalLM | GPT2LMHeadModel:
    seed_everything(seed)
    model = (GPT2LMHeadModel if HP.get("family") == "gpt2" else LlamaForCausalLM)(config())
    model.set_attn_implementation("eager")
    if HP.get("attention_only"):  # MLPs zeroed and frozen: nothing after attention can gate a head's output
        blocks = model.transformer.h if HP.get("family") == "gpt2" else model.model.layers
        for block in blocks:
            for param in block.mlp.parameters():
                param.data.zero_()
                param.requires_grad_(False)
    return model


def make_suite(n_items: int, seed: int) -> PromptSuite:
    return bigram_backcopy(n_items, seq_len=HP["seq_len"], vocab_size=HP["vocab_size"], seed=seed,
                           n_triggers=HP["n_triggers"], chain_seed=HP["chain_seed"], alpha=HP.get("alpha", 0.2),
                           trigger_rate=HP.get("trigger_rate", 0.1), name="sink-lm")


def tensors(suite: PromptSuite) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids [batch, seq]`` and ``trigger [batch, seq]`` (True at query positions whose next token is a copy)."""
    ids = torch.tensor([item.ids for item in suite.items])
    trigger = torch.zeros_like(ids, dtype=torch.bool)
    for row, item in enumerate(suite.items):
        trigger[row, item.metadata["trigger_positions"]] = True
    return ids, trigger


def _oracle_argmax() -> torch.Tensor:
    probs = bigram_transitions(HP["vocab_size"], HP["n_triggers"], HP["chain_seed"], alpha=HP.get("alpha", 0.2),
                               trigger_rate=HP.get("trigger_rate", 0.1))
    return torch.as_tensor(np.argmax(probs, axis=1))


@torch.no_grad()
def task_metrics(model: torch.nn.Module, ids: torch.Tensor, trigger: torch.Tensor,
                 attention_mask: torch.Tensor | None = None) -> dict[str, float]:
    """``backcopy``: accuracy at triggers; ``bigram``: agreement with the chain's most likely next token elsewhere."""
    logits = model(input_ids=ids, attention_mask=attention_mask).logits[:, :-1]
    pred = logits.argmax(-1)
    trig = trigger[:, :-1]
    plain = ~trig & (ids[:, :-1] > HP["n_triggers"])
    plain[:, 0] = False
    backcopy = (pred == ids[:, 1:])[trig].float().mean()
    bigram = (pred == _oracle_argmax()[ids[:, :-1]])[plain].float().mean()
    nll = F.cross_entropy(logits[:, 1:].reshape(-1, logits.shape[-1]), ids[:, 2:].reshape(-1))
    return {"backcopy": float(backcopy), "bigram": float(bigram), "nll": float(nll)}


def head_scores(model: torch.nn.Module, ids: torch.Tensor, trigger: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per head: BOS mass over non-trigger / trigger queries (t >= 1) and attention from a trigger to t-1."""
    attn = attention_patterns(model, ids)  # [layer, batch, head, query, key]
    bos = attn[..., 1:, 0]  # [layer, batch, head, query-1]
    trig = trigger[:, 1:][None, :, None, :].expand_as(bos)
    seq = ids.shape[1]
    q = torch.arange(1, seq)
    prev = attn[:, :, :, q, q - 1]
    mean = lambda x, m: (x * m).sum(dim=(1, 3)) / m.sum(dim=(1, 3))  # noqa: E731
    return {"sink_mass": mean(bos, (~trig).float()), "sink_mass_at_triggers": mean(bos, trig.float()),
            "trigger_to_previous": mean(prev, trig.float())}


def _bos_hidden_mask(ids: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(ids)
    mask[:, 0] = 0
    return mask


def analyze(model: torch.nn.Module, n_items: int = 256, seed: int = HELDOUT_SEED) -> dict[str, Any]:
    ids, trigger = tensors(make_suite(n_items, seed))
    metrics = task_metrics(model, ids, trigger)
    scores = head_scores(model, ids, trigger)
    heads = [(l, h) for l in range(HP["n_layers"]) for h in range(HP["n_heads"])]
    sinks = [(l, h) for l, h in heads if scores["sink_mass"][l, h] >= SINK_THRESHOLD]
    copiers = [(l, h) for l, h in heads if scores["trigger_to_previous"][l, h] >= COPY_THRESHOLD]
    key = copiers or [divmod(int(scores["trigger_to_previous"].argmax()), HP["n_heads"])]
    studies = ablation_studies(model, {"active_dormant_backcopy": key}, heads,
                               lambda m: task_metrics(m, ids, trigger)["backcopy"],
                               metric_name="back-copy accuracy at trigger positions",
                               chance=round(1 / HP["vocab_size"], 4), seed=seed)
    hidden = task_metrics(model, ids, trigger, attention_mask=_bos_hidden_mask(ids))
    gt = {"sink": [head_name(*h) for h in sinks], "active_dormant_backcopy": [head_name(*h) for h in key]}
    return {"metrics": metrics, "bos_hidden": hidden, "n_items": n_items, "seed": seed, "ground_truth": gt,
            "scores": {k: scores_table(v) for k, v in scores.items()}, "ablation": studies,
            "sink_fraction": round(len(sinks) / len(heads), 4)}


def fit(seed: int = SEED, steps: int = STEPS) -> tuple[LlamaForCausalLM, dict[str, Any]]:
    with torch_threads(1):
        model = build_model(seed)
        probe_ids, probe_trig = tensors(make_suite(64, HELDOUT_SEED + 1))
        curve: list[list[float]] = []

        def loss_fn(m: torch.nn.Module, step: int) -> torch.Tensor:
            ids, _ = tensors(make_suite(HP["batch_size"], step_seed(seed, step)))
            return m(input_ids=ids, labels=ids).loss

        def measure() -> list[float]:
            sink = head_scores(model, probe_ids, probe_trig)["sink_mass"]
            met = task_metrics(model, probe_ids, probe_trig)
            return [met["backcopy"], met["bigram"], sink.max()]

        log = train_loop(model, loss_fn, steps=steps, lr=HP["lr"], warmup=HP["warmup"], desc="sink-lm",
                         weight_decay=HP.get("weight_decay", 0.0),
                         log_every=100, on_log=curve_logger(model, measure, curve))
    log["curve"] = curve
    return model, log


def train(out_dir: str | Path, seed: int = SEED, steps: int = STEPS) -> Path:
    model, log, result, out = fit_analyse_save(fit, analyze, seed, steps, out_dir)
    card = base_card(SPEC, model, seed, log, HP, data={"generator": "bigram_backcopy",
                                                       "params": make_suite(1, 0).params})
    card["architecture"].update(architecture_fields(
        HP, HP["seq_len"], positions="learned absolute" if HP["family"] == "gpt2" else "RoPE",
        mlp="zeroed and frozen (attention-only)" if HP["attention_only"] else "standard",
        attention_scale="1 (scale_attn_weights=False)" if not HP["scale_attn_weights"] else "1/sqrt(d_head)",
        tied_embeddings=HP["tie_embeddings"]))
    card["training"]["curve [step, backcopy acc, bigram acc, max sink mass]"] = log["curve"]
    card["evaluation"] = {"metric": "back-copy accuracy at trigger positions",
                          "value": round(result["metrics"]["backcopy"], 4),
                          "bigram_agreement": round(result["metrics"]["bigram"], 4),
                          "n_items": result["n_items"], "seed": result["seed"],
                          "chance": round(1 / HP["vocab_size"], 4)}
    card["ground_truth_heads"] = result["ground_truth"]
    card["ground_truth_rules"] = {
        "sink": f"mean attention mass on position 0 (BOS) over non-trigger queries t >= 1 is >= {SINK_THRESHOLD}",
        "active_dormant_backcopy": f"mean attention from a trigger to t-1 >= {COPY_THRESHOLD}"}
    card["head_scores"] = result["scores"]
    card["sink_fraction"] = result["sink_fraction"]
    card["ablation"] = result["ablation"]
    card["sink_removal"] = {"description": "BOS key hidden from every query via the attention mask",
                            "clean": {k: round(v, 4) for k, v in result["metrics"].items()},
                            "bos_hidden": {k: round(v, 4) for k, v in result["bos_hidden"].items()}}
    card["notes"] = ["Position 0 always holds BOS (id 0); `sink_mass` excludes trigger queries, where the "
                     "active heads attend to t-1 instead.",
                     "Heads whose sink mass is high at triggers too are pure (always dormant) sinks."]
    write_card(out, card)
    return out
