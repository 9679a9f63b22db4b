"""Batched single-head sweep, Michel et al. importance and pruning (masking and structural) on tiny models.

Oracles: a loop of single ``apply_plan`` ablations (sweep), central finite differences of the per-item losses
w.r.t. head gates in float64 (importance), the masked model's output (structural pruning).
"""

import copy
import json

import pytest
import torch
from tiny_models import tiny_text_model

from attnscope.circuits.head_ablation import ablation_loop, single_head_sweep
from attnscope.circuits.importance import VARIANTS, head_importance, normalize_importance
from attnscope.circuits.pruning import (ablation_importance, evaluate_masked, heads_of_mask, iterative_pruning,
                                       pruning_curve)
from attnscope.circuits.registry import get_analysis
from attnscope.circuits.structural import load_pruned, prune_heads_structurally, save_pruned
from attnscope.circuits.task_metrics import (AnswerLoss, EmbeddingCosine, NextTokenAccuracy, eval_batches,
                                             forward, sentence_embeddings)
from attnscope.cli import main
from attnscope.datasets import PromptItem, PromptSuite, induction
from attnscope.probes.heads import HeadSet
from attnscope.probes.interventions import InterventionPlan, apply_plan


def _lm_batches(n=6, batch_size=4):
    return eval_batches(induction(n, seq_len=16, vocab_size=64, seed=1), batch_size=batch_size)


def _encoder_batches():
    g = torch.Generator().manual_seed(5)
    items = [PromptItem(ids=torch.randint(4, 64, (int(n),), generator=g).tolist()) for n in (9, 12, 7, 12, 10)]
    return eval_batches(PromptSuite("ids", items), batch_size=3)


@pytest.mark.parametrize("family,mode", [("gpt2", "zero"), ("qwen2", "mean"), ("bert", "mean"),
                                         ("llama", "rescale")])
def test_batched_sweep_equals_loop_of_single_ablations(family, mode):
    model = tiny_text_model(family)
    if family == "bert":
        batches = _encoder_batches()
        metrics = [EmbeddingCosine(sentence_embeddings(model, batches))]
    else:
        batches = _lm_batches()
        metrics = [AnswerLoss()] + ([NextTokenAccuracy()] if family == "gpt2" else [])
    deltas = []
    for metric in metrics:
        table = single_head_sweep(model, batches, metric, mode=mode, scale=0.3, heads_per_pass=3)
        loop = ablation_loop(model, batches, metric, mode=mode, scale=0.3)
        assert len(table) == len(loop) == 8
        assert table.provenance["forward_passes"] == len(batches) * 4  # per layer, 4 heads in chunks of 3 + 1
        for row in table.df.itertuples():
            assert abs(row.value - loop[(row.layer, row.head)]) < 1e-5
        deltas.append(table.df["delta"].abs().max())
    assert max(deltas) > 1e-6  # the ablations change the metric


def test_sweep_memory_budget_and_prefix_sharing():
    model, batches = tiny_text_model("llama"), _lm_batches()
    small = single_head_sweep(model, batches, AnswerLoss(), memory_mb=0.2)
    big = single_head_sweep(model, batches, AnswerLoss(), memory_mb=512)
    plain = single_head_sweep(model, batches, AnswerLoss(), memory_mb=512, share_prefix=False)
    assert big.provenance["share_prefix"] and not plain.provenance["share_prefix"]
    assert small.provenance["forward_passes"] > big.provenance["forward_passes"] == 2 * len(batches)
    assert (small.df["value"] - big.df["value"]).abs().max() < 1e-5
    assert (plain.df["value"] - big.df["value"]).abs().max() < 1e-5


def _per_item_losses(model, batches, metric):
    with torch.no_grad():
        return torch.cat([metric.loss(forward(model, b), b) for b in batches]).double()


def _finite_differences(model, batches, metric, eps=1e-4):
    """[layer, head, item] dL(x)/dxi_h by central differences (rescale the head by 1 +- eps)."""
    grads = torch.zeros(2, 4, sum(len(b) for b in batches), dtype=torch.float64)
    for layer in range(2):
        for head in range(4):
            vals = []
            for scale in (1 + eps, 1 - eps):
                with apply_plan(model, InterventionPlan(HeadSet([(layer, head)]), "rescale", scale=scale)):
                    vals.append(_per_item_losses(model, batches, metric))
            grads[layer, head] = (vals[0] - vals[1]) / (2 * eps)
    return grads


def _float64(model):
    """The model in float64, RMSNorm included (HF computes it in float32, too coarse for finite differences)."""
    model = model.double()
    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm"):
            m.forward = lambda x, m=m: m.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.variance_epsilon)
    return model


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_importance_equals_finite_differences_of_gated_loss(family):
    model = _float64(tiny_text_model(family))
    batches, metric = _lm_batches(), AnswerLoss()
    fd = _finite_differences(model, batches, metric)
    per_example = head_importance(model, batches, metric, variant="abs_per_example", normalize_layers=False)
    of_sum = head_importance(model, batches, metric, variant="abs_of_sum", normalize_layers=False)
    torch.testing.assert_close(per_example.raw.double(), fd.abs().mean(-1), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(of_sum.raw.double(), fd.mean(-1).abs(), rtol=1e-4, atol=1e-7)
    assert (per_example.raw > of_sum.raw + 1e-6).any()  # the variants really differ


def test_variants_are_ordered_and_normalisation_options():
    model, batches, metric = tiny_text_model("gpt2"), _lm_batches(), AnswerLoss()
    raw = {v: head_importance(model, batches, metric, variant=v, normalize_layers=False).raw for v in VARIANTS}
    tol = 1e-6
    assert (raw["abs_per_token"] >= raw["abs_per_example"] - tol).all()
    assert (raw["abs_per_example"] >= raw["abs_per_batch"] - tol).all()
    assert (raw["abs_per_batch"] >= raw["abs_of_sum"] - tol).all()
    imp = head_importance(model, batches, metric)
    torch.testing.assert_close(imp.normalized.norm(dim=-1), torch.ones(2), atol=1e-5, rtol=0)
    both = normalize_importance(imp.raw, normalize_layers=True, global_minmax=True)
    assert float(both.min()) == 0.0 and abs(float(both.max()) - 1.0) < 1e-6
    table = imp.table()
    assert set(table.df["metric"]) == {"importance", "importance_raw"} and len(table) == 16


def test_importance_under_a_mask_is_the_derivative_at_gate_zero():
    model = _float64(tiny_text_model("llama"))
    batches, metric = _lm_batches(), AnswerLoss()
    mask = torch.ones(2, 4)
    mask[1, 2] = 0
    masked = head_importance(model, batches, metric, head_mask=mask, variant="abs_of_sum", normalize_layers=False)
    eps, vals = 1e-4, []
    for scale in (eps, -eps):  # the masked head's gate around 0, every other head at 1
        with apply_plan(model, InterventionPlan(HeadSet([(1, 2)]), "rescale", scale=scale)):
            vals.append(_per_item_losses(model, batches, metric))
    fd = ((vals[0] - vals[1]) / (2 * eps)).mean().abs()
    assert abs(float(masked.raw[1, 2]) - float(fd)) < 1e-4 * float(fd) + 1e-8
    assert get_analysis("importance").takes == "model"


def test_iterative_pruning_follows_the_threshold_and_resumes():
    model, batches, metric = tiny_text_model("gpt2"), _lm_batches(), AnswerLoss()
    full = iterative_pruning(model, batches, metric, masking_amount=0.125, threshold=0.995)
    assert full.steps, "at least one step was tried"
    accepted = [s for s in full.steps if s["accepted"]]
    assert all(s["metric"] <= full.original / 0.995 for s in accepted)
    assert not full.steps[-1]["accepted"] or len(heads_of_mask(full.mask)) >= 7
    assert len(full.pruned) == (accepted[-1]["n_pruned"] if accepted else 0)
    assert abs(evaluate_masked(model, batches, metric, full.mask) - full.final) < 1e-9
    states = []
    first = iterative_pruning(model, batches, metric, masking_amount=0.125, threshold=0.995, max_steps=1,
                              on_step=lambda rec, state: states.append(json.loads(json.dumps(state))))
    assert len(first.steps) == 1 and not first.options["state"]["done"]
    resumed = iterative_pruning(model, batches, metric, masking_amount=0.125, threshold=0.995, resume=states[-1])
    assert torch.equal(resumed.mask, full.mask) and len(resumed.steps) == len(full.steps)
    assert full.table().df["accepted"].tolist() == [s["accepted"] for s in full.steps]


def test_ablation_importance_is_the_measured_damage():
    model, batches, metric = tiny_text_model("gpt2"), _lm_batches(), AnswerLoss()
    mask = torch.ones(2, 4)
    mask[0, 3] = 0
    damage = ablation_importance(model, batches, metric, head_mask=mask)
    clean = evaluate_masked(model, batches, metric, mask)
    for layer, head in [(0, 0), (1, 2)]:
        both = mask.clone()
        both[layer, head] = 0
        want = evaluate_masked(model, batches, metric, both) - clean  # loss: damage = ablated - clean
        assert abs(float(damage[layer, head]) - want) < 1e-5
    assert float(damage[0, 3]) == 0.0


def test_kv_granularity_prunes_whole_groups():
    model, batches, metric = tiny_text_model("llama"), _lm_batches(), AnswerLoss()
    result = iterative_pruning(model, batches, metric, masking_amount=0.25, threshold=0.5, granularity="kv",
                               max_steps=2)
    pruned = result.pruned
    for layer in pruned.layers:
        heads = pruned.heads_in_layer(layer)
        assert all({2 * (h // 2), 2 * (h // 2) + 1} <= set(heads) for h in heads)


def test_pruning_curve_table():
    model, batches, metric = tiny_text_model("gpt2"), _lm_batches(), AnswerLoss()
    table = pruning_curve(model, batches, metric, fractions=(0.0, 0.25, 0.5), n_random=2,
                          orders=("importance", "importance_reestimated", "ablation", "random"))
    df = table.df
    assert set(df["order"]) == {"importance", "importance_reestimated", "ablation", "random", "random_mean"}
    assert len(df[df["order"] == "random"]) == 6
    start = df[df["fraction"] == 0.0]["value"]
    assert start.max() - start.min() < 1e-9  # nothing pruned: every order starts at the clean metric
    assert set(df[df["order"] == "importance"]["n_pruned"]) == {0, 2, 4}


@pytest.mark.parametrize("family,spec", [("gpt2", "L0H1,L0H2,L1H0,L1H1,L1H2,L1H3"), ("llama", "L0H0,L0H1,L1H1"),
                                         ("qwen2", "L0H1,L1H0,L1H3"), ("mistral", "L0H2,L0H3"),
                                         ("bert", "L0H0,L1H1,L1H2")])
def test_structural_pruning_equals_masking_and_reloads_smaller(family, spec, tmp_path):
    model = tiny_text_model(family)
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    heads = HeadSet.parse(spec)
    out = lambda m: m(input_ids=ids, attention_mask=mask)[0]  # noqa: E731
    with torch.no_grad(), apply_plan(model, InterventionPlan(heads, "zero")):
        masked = out(model)
    pruned = copy.deepcopy(model)
    report = prune_heads_structurally(pruned, heads)
    with torch.no_grad():
        torch.testing.assert_close(out(pruned), masked, atol=1e-5, rtol=0)
    assert report.params_after < report.params_before
    if family == "llama":  # L0: KV head 0 goes with both its query heads; L1: uneven groups keep a placeholder
        assert report.kv_heads_per_layer == [1, 2] and report.placeholders == ["L1H1"]
        assert any("GQA" in note for note in report.notes)
    if family == "gpt2":
        assert report.heads_per_layer == [2, 1] and report.placeholders == ["L1H0"]  # empty layer keeps one
    save_pruned(pruned, tmp_path / "m")
    reloaded = load_pruned(tmp_path / "m")
    assert sum(p.numel() for p in reloaded.parameters()) == report.params_after
    with torch.no_grad():
        torch.testing.assert_close(out(reloaded), masked, atol=1e-5, rtol=0)


def test_cli_ablate_and_resumable_prune(tmp_path, capsys):
    model = tiny_text_model("gpt2")
    model.save_pretrained(tmp_path / "tiny")
    common = ["--model", str(tmp_path / "tiny"), "--suite", "induction", "--suite-args",
              "vocab_size=64,seq_len=16", "--n", "6", "--metric", "loss"]
    assert main(["ablate", *common, "--heads", "L1H0,L1H3", "--mode", "zero"]) == 0
    text = capsys.readouterr().out
    assert "before:" in text and "after:" in text and "L1H0,L1H3" in text
    assert main(["ablate", *common, "--heads", "L1H0", "--mode", "rescale"]) == 2
    assert "rescale needs a scale" in capsys.readouterr().err
    out = tmp_path / "pruned"
    args = ["prune", *common, "--keep-metric", "0.995", "--masking-amount", "0.125", "--structural", "--out",
            str(out)]
    assert main(args) == 0
    first = json.loads((out / "summary.json").read_text())
    assert (out / "steps.parquet").is_file() and (out / "model" / "config.json").is_file()
    assert main(args) == 0
    assert "resuming" in capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["pruned_heads"] == first["pruned_heads"]
    if first["n_pruned"]:
        assert first["structural"] and first["speed"]["params_pruned"] < first["speed"]["params_original"]
        assert sum(p.numel() for p in load_pruned(out / "model").parameters()) == first["speed"]["params_pruned"]
    assert main([*args[:-1], str(out), "--variant", "abs_of_sum"]) == 2  # other options, same folder
