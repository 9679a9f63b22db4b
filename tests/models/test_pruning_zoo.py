"""Behaviour on trained weights: importance-ordered pruning beats random order on a zoo organism; on the real
MiniLM a pruning curve of the cosine similarity of sentence embeddings (mean pooling) to the unpruned model."""

import pytest
import torch

import attnscope
from attnscope.circuits.importance import head_importance
from attnscope.circuits.pruning import curve_gap, iterative_pruning, pruning_curve
from attnscope.circuits.structural import prune_heads_structurally
from attnscope.circuits.task_metrics import metric_for
from attnscope.datasets import sentences
from attnscope.tasks import build_suite


def _zoo(name):
    from attnscope import zoo

    zoo.checkpoint_path(name)  # raises ModelNotFoundError if the shipped checkpoint is missing
    return attnscope.load(f"zoo:{name}")


@pytest.fixture(scope="module")
def induction_organism():
    model = _zoo("induction-2l")
    suite = build_suite("default", model, n_items=48)
    batches, metric = metric_for(model, suite, "accuracy", batch_size=48)
    return model, batches, metric


def test_importance_order_beats_random_order_at_every_sparsity(induction_organism):
    model, batches, metric = induction_organism
    fractions = [i / 8 for i in range(1, 8)]  # 8 heads: one more head per step
    table = pruning_curve(model, batches, metric, fractions=fractions, n_random=6, seed=0)
    gap = curve_gap(table, "importance", "random_mean")
    assert set(gap) == set(fractions)
    assert all(g >= -1e-9 for g in gap.values()), gap
    assert sum(g > 0.02 for g in gap.values()) >= 4, gap


def test_organism_ground_truth_heads_rank_on_top_and_pruning_keeps_them(induction_organism):
    from attnscope import zoo
    from attnscope.probes.heads import HeadSet

    model, batches, metric = induction_organism
    card = zoo.load_card("induction-2l")
    truth = set(HeadSet.parse(",".join(h for heads in card["ground_truth_heads"].values() for h in heads)))
    for variant in ("abs_per_example", "abs_of_sum"):
        imp = head_importance(model, batches, metric, variant=variant).normalized
        ranked = [divmod(int(i), imp.shape[1]) for i in imp.flatten().argsort(descending=True)]
        assert set(ranked[:len(truth)]) == truth, (variant, ranked, truth)
    result = iterative_pruning(model, batches, metric)  # paper defaults: 10% per step, stop below 0.9x
    assert result.final >= 0.9 * result.original
    assert not truth & set(result.pruned), "Michel pruning removed a ground-truth head"
    assert len(result.pruned) >= 8 - len(truth) - 1


def test_gqa_organism_structural_pruning_of_whole_kv_groups(tmp_path):
    import copy

    from attnscope.circuits.structural import load_pruned, save_pruned
    from attnscope.probes.head_slices import output_projections, query_heads_of
    from attnscope.probes.heads import HeadSet
    from attnscope.probes.interventions import InterventionPlan, apply_plan

    model = _zoo("recall-llama")
    suite = build_suite("default", model, n_items=32)
    batches, metric = metric_for(model, suite, "accuracy", batch_size=32)
    imp = head_importance(model, batches, metric).normalized
    groups = [(p.layer, query_heads_of(kv, p.n_heads, p.n_kv_heads)) for p in output_projections(model)
              for kv in range(p.n_kv_heads)]
    groups.sort(key=lambda g: float(sum(imp[g[0], h] for h in g[1])))
    heads = HeadSet((layer, h) for layer, hs in groups[:max(1, len(groups) // 4)] for h in hs)
    batch = batches[0]
    with torch.no_grad(), apply_plan(model, InterventionPlan(heads, "zero")):
        masked = model.module(**batch.inputs).logits
    pruned = copy.deepcopy(model.module)
    report = prune_heads_structurally(pruned, heads)
    assert report.kv_removed and report.params_after < report.params_before
    real = batch.attention_mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(pruned(**batch.inputs).logits[real], masked[real], atol=1e-4, rtol=0)
    save_pruned(pruned, tmp_path / "m")
    assert sum(p.numel() for p in load_pruned(tmp_path / "m").parameters()) == report.params_after


@pytest.fixture(scope="module")
def minilm_curve(minilm):
    suite = sentences(32, seed=0, sentences_per_item=1)
    batches, metric = metric_for(minilm, suite, "embedding_cosine", batch_size=32)
    table = pruning_curve(minilm, batches, metric, fractions=(0.0, 0.1, 0.2, 0.3, 0.5, 0.7), n_random=2)
    return batches, metric, table


def test_minilm_pruning_curve_of_embedding_cosine(minilm_curve):
    _, metric, table = minilm_curve
    df = table.df
    assert metric.name == "embedding_cosine"
    imp = df[df["order"] == "importance"].set_index("fraction")["value"]
    assert abs(imp[0.0] - 1.0) < 1e-6  # unpruned model: identical embeddings
    assert imp[0.7] < imp[0.1] < 1.0  # pruning more heads moves the embeddings further
    gap = curve_gap(table, "importance", "random_mean")
    assert sum(g > 0 for f, g in gap.items() if f > 0) >= 4, gap  # importance order hurts less than random


def test_minilm_structural_pruning_is_smaller_and_equal(minilm, minilm_curve):
    import copy

    from attnscope.probes.heads import HeadSet
    from attnscope.probes.interventions import InterventionPlan, apply_plan

    batches, _, _ = minilm_curve
    heads = HeadSet.parse("L0H1,L0H5,L2H*,L4H3", n_layers=6, n_heads=12)
    batch = batches[0]
    with torch.no_grad(), apply_plan(minilm, InterventionPlan(heads, "zero")):
        masked = minilm.module(**batch.inputs).last_hidden_state
    pruned = copy.deepcopy(minilm.module)
    report = prune_heads_structurally(pruned, heads)
    real = batch.attention_mask.bool()  # padding rows amplify float32 rounding (exact in float64)
    with torch.no_grad():
        got = pruned(**batch.inputs).last_hidden_state
    torch.testing.assert_close(got[real], masked[real], atol=1e-5, rtol=0)
    assert report.heads_per_layer == [10, 12, 1, 12, 11, 12] and report.params_after < report.params_before
