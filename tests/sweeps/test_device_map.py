"""Models split across placements (no Ray): half the blocks on "cpu", half offloaded to "disk" (held on the meta
device, moved in by accelerate's hooks at run time). Capture, streaming statistics and head interventions must
equal the unsplit model exactly."""

import pytest
import torch
from tiny_models import tiny_text_model

import attnscope
from attnscope.probes.device_map import dispatch, parse_device_map, placement, split_layers
from attnscope.probes.heads import HeadSet
from attnscope.probes.interventions import InterventionPlan, apply_plan, mean_plan

IDS = torch.tensor([[1, 5, 9, 2, 7, 3, 8], [4, 6, 2, 9, 1, 0, 0]])
INPUTS = {"input_ids": IDS, "attention_mask": (torch.arange(7) < torch.tensor([[7], [5]])).long()}


def _split_loaded(tmp_path, family):
    reference = tiny_text_model(family)
    reference.save_pretrained(tmp_path / family)
    device_map = split_layers(reference, ["cpu", "disk"])  # embeddings, norm, head: cpu; block 1: disk
    split = attnscope.load(tmp_path / family, device_map=device_map, offload_folder=str(tmp_path / "offload"))
    return attnscope.load(reference), split


def _same_capture(a, b):
    full_a, full_b = attnscope.capture(a, INPUTS), attnscope.capture(b, INPUTS)
    assert torch.equal(full_a.stack(), full_b.stack())
    options = dict(stats=("mass", "entropy", "topk"), mass_spans=[(0, 1), (2, 4)], topk=3, heads="L1H*")
    stats_a, stats_b = attnscope.capture(a, INPUTS, **options), attnscope.capture(b, INPUTS, **options)
    for name in ("mass", "entropy", "topk_index", "topk_weight"):
        assert torch.equal(stats_a.stat(name), stats_b.stat(name)), name
        assert stats_b.stat(name).device.type == "cpu"


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_from_pretrained_device_map_with_disk_offload_equals_unsplit(tmp_path, family):
    reference, split = _split_loaded(tmp_path, family)
    where = placement(split)
    assert where.get("disk", 0) > 0 and where.get("cpu", 0) > 0
    assert any(p.device.type == "meta" for p in split.module.parameters())  # weights move in at run time
    _same_capture(reference, split)
    ids = INPUTS
    for plan in (InterventionPlan(HeadSet([(0, 1), (1, 0)]), "zero"),
                 InterventionPlan(HeadSet([(1, 2)]), "rescale", scale=0.25),
                 mean_plan(reference.module, HeadSet([(1, 1)]), [[3, 4, 5, 6], [7, 8, 9]])):
        with torch.no_grad(), apply_plan(reference, plan):
            want = reference.module(**ids).logits
        with torch.no_grad(), apply_plan(split, plan):
            got = split.module(**ids).logits
        assert torch.equal(want, got), plan.mode
        assert not torch.equal(want, reference.module(**ids).logits)  # the plan did something


def test_split_mean_plan_is_computed_on_the_split_model(tmp_path):
    reference, split = _split_loaded(tmp_path, "llama")
    refs = [[3, 4, 5, 6], [7, 8, 9]]
    assert mean_plan(split.module, HeadSet([(1, 1)]), refs).mean_values == \
        mean_plan(reference.module, HeadSet([(1, 1)]), refs).mean_values


def test_dispatch_of_a_built_model(tmp_path):
    reference, model = tiny_text_model("gpt2"), tiny_text_model("gpt2")
    dispatch(model, split_layers(model, ["cpu", "disk"]), offload_folder=tmp_path / "off")
    assert placement(model)["disk"] > 0
    _same_capture(reference, model)


def test_parse_device_map_forms(tmp_path):
    (tmp_path / "m.json").write_text('{"model.layers.0": 0, "lm_head": "cpu"}')
    assert parse_device_map(str(tmp_path / "m.json")) == {"model.layers.0": 0, "lm_head": "cpu"}
    assert parse_device_map("cuda:1") == {"": "cuda:1"} and parse_device_map("balanced") == "balanced"
    with pytest.raises(attnscope.InputError):
        parse_device_map("everywhere")
