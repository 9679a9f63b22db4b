"""Issue #8's ground-truth checks on the trained shapes organisms (benchmarks/shapes_multimodal.py prints the full
tables): DAAM maps land on their objects; weakening the most HRV-relevant heads of a colour removes it faster than
weakening the least relevant ones (judged by the shapes classifier); the VLM's visual heads look at the queried
object."""

import pytest
import torch

import attnscope
from attnscope.circuits.daam_segmentation import best_aggregation, daam_iou
from attnscope.circuits.hrv import head_relevance
from attnscope.circuits.hrv_weakening import ordered_weakening
from attnscope.datasets.shapes import COLORS, shapes_scenes
from attnscope.zoo.shapes_checks import concept_scorer, teacher_forced_daam, two_object_scenes


@pytest.fixture(scope="module")
def pipe():
    return attnscope.load("zoo:shapes-diffusion")


def test_daam_maps_of_object_words_overlap_their_own_objects(pipe):
    result, masks = teacher_forced_daam(pipe, two_object_scenes(12, seed=77))
    own, other = daam_iou(result, masks), daam_iou(result, masks.flip(1))  # flip: the other object's mask
    full = lambda t: t.df[(t.df["site"] == "all") & (t.df["step"] == -1)]["value"].mean()  # noqa: E731
    area = float(masks.float().mean())  # the IoU of a constant map (its mask is the whole image)
    assert full(own) > max(2 * full(other), area + 0.1), (full(own), full(other), area)
    best = best_aggregation(own)
    assert best["iou"] > 0.45 and best["iou"] >= full(own)


@pytest.mark.slow  # about a minute: the benchmark's setting (12 prompts per colour); with 8 prompts red flips
def test_weakening_the_most_relevant_heads_removes_a_colour_faster(pipe):
    captions = [s.caption for s in shapes_scenes(24, seed=3)]
    hrv = head_relevance(pipe, captions, {c: [c] for c in COLORS}, num_inference_steps=10, guidance_scale=3.0)
    gaps = {}
    for colour in COLORS:
        prompts = [s.caption for s in shapes_scenes(80, seed=11) if colour in s.caption.split()][:12]
        table = ordered_weakening(pipe, prompts, hrv, colour, colour, concept_scorer(colour), ks=(0, 2, 4, 6, 8, 12),
                                  seed=5, num_inference_steps=10, guidance_scale=3.0).df
        curve = table.pivot_table(index="k", columns="order", values="value")
        assert curve.loc[0, "MoRHF"] == curve.loc[0, "LeRHF"]  # k = 0 weakens nothing in either order
        ks = [2, 4, 6, 8, 12]  # between nothing and every head weakened
        gaps[colour] = float((curve.loc[ks, "LeRHF"] - curve.loc[ks, "MoRHF"]).mean())
    assert sum(g > 0 for g in gaps.values()) >= 3 and sum(gaps.values()) / len(gaps) > 0.15, gaps


def test_vlm_heads_attend_to_the_queried_object_more_than_to_the_rest():
    from attnscope.circuits.visual_head_scores import top_visual_heads, visual_heads
    from attnscope.datasets.shapes_vlm_suite import shapes_vlm_examples

    vlm = attnscope.load("zoo:shapes-vlm")
    table = visual_heads(vlm, shapes_vlm_examples(vlm, 32, seed=9), queries="last").df
    ratio = table[table["metric"] == "target_ratio"].set_index(["layer", "head"])["value"]
    top = top_visual_heads(attnscope.ResultTable(table), 2, metric="target_ratio")
    assert all(ratio[h] > 2.0 for h in top), ratio.to_dict()
    assert torch.tensor(ratio.to_numpy()).median() > 1.0
