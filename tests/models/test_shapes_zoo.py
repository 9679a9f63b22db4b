"""The shipped shapes organisms (shapes-vlm, shapes-diffusion, shapes-classifier): they load through
``attnscope.load`` / ``zoo.load_model``, pass ``validate``, capture, and do their task on fresh seeded data.

Labels here come from the scenes' objects (a plain transcription, not the zoo's helpers); VLM inputs go through
the shipped processor, not the zoo's training encoder. No retraining.
"""

import json

import numpy as np
import pytest
import torch

import attnscope
from attnscope import zoo
from attnscope.datasets.shapes import COLORS, POSITIONS, SHAPES, make_scene, patch_masks, scene_of, shapes_vqa
from attnscope.probes import validate

SEED = 97_531  # neither a training seed (>= 2**31) nor a card seed (1_000_0xx)
SHAPES_NAMES = ["shapes-classifier", "shapes-vlm", "shapes-diffusion"]


def _heads(names):
    return [(int(n.rsplit("L", 1)[1].split("H")[0]), int(n.split("H")[-1])) for n in names]


def _truth(scenes):
    """``[n, half, 2]``: (colour index in none+COLORS, shape index in none+SHAPES) per image half."""
    out = torch.zeros(len(scenes), 2, 2, dtype=torch.long)
    for b, s in enumerate(scenes):
        for o in s.objects:
            out[b, POSITIONS.index(o.position)] = torch.tensor([1 + list(COLORS).index(o.color),
                                                                1 + SHAPES.index(o.shape)])
    return out


def _read(classifier, images01):
    with torch.no_grad():
        color, shape = classifier(images01 * 2 - 1)
    return torch.stack([color.argmax(-1), shape.argmax(-1)], -1)


@pytest.fixture(scope="module")
def cards():
    return {name: zoo.load_card(name) for name in SHAPES_NAMES}


@pytest.fixture(scope="module")
def classifier():
    return zoo.load_model("shapes-classifier")


@pytest.fixture(scope="module")
def vlm():
    return attnscope.load("zoo:shapes-vlm")


@pytest.fixture(scope="module")
def pipe():
    return attnscope.load("zoo:shapes-diffusion").module


def test_listed_with_cards_and_small_checkpoints(cards):
    listed = {o["name"]: o for o in zoo.list_organisms()}
    for name in SHAPES_NAMES:
        assert listed[name]["trained"], name
        path = zoo.checkpoint_path(name)
        assert (path / "MODEL_CARD.md").read_text().startswith(f"# {name}")
        assert json.loads((path / "card.json").read_text()) == cards[name]
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        assert 100_000 < size < 8_000_000, (name, size)
    assert cards["shapes-vlm"]["ground_truth_heads"]["object_readout"]


# ---- classifier --------------------------------------------------------------------------------------------------

def test_classifier_is_a_plain_module_without_attention(classifier):
    from attnscope.errors import UnsupportedModelError
    from attnscope.zoo.shapes_classifier import ShapesClassifier

    assert isinstance(classifier, ShapesClassifier) and zoo.has_own_loader("shapes-classifier")
    with pytest.raises(UnsupportedModelError):  # nothing to capture: a named error, not a crash
        attnscope.load("zoo:shapes-classifier")


def test_classifier_reads_fresh_scenes(classifier, cards):
    scenes = [make_scene(SEED, i) for i in range(512)]
    images = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1).float() / 255 for s in scenes])
    acc = float((_read(classifier, images) == _truth(scenes)).all(-1).float().mean())
    assert acc >= 0.98 and acc >= cards["shapes-classifier"]["evaluation"]["value"] - 0.02


# ---- VLM -----------------------------------------------------------------------------------------------------------

def _vlm_batch(vlm, n, seed=SEED):
    suite = shapes_vqa(n, seed=seed)
    scenes = [scene_of(item) for item in suite]
    proc = vlm.tokenizer
    enc = proc(text=[f"<image> {it.text}" for it in suite], images=[s.image for s in scenes], return_tensors="pt",
               padding=True)
    return suite, scenes, enc


def test_vlm_loads_with_processor_and_validates(vlm):
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    assert isinstance(vlm.module, LlavaForConditionalGeneration) and isinstance(vlm.tokenizer, LlavaProcessor)
    report = validate(vlm)
    assert report.ok, str(report)


def test_vlm_capture_from_text_and_image(vlm):
    scene = make_scene(SEED, 1)
    trace = attnscope.capture(vlm, ("what color is the square ?", scene.image))
    spans = [(s.start, s.end) for s in trace.tokens.spans if s.modality == "image"]
    assert spans == [(0, 16)]
    assert {s.tower for s in trace.sites} == {"text", "vision"}
    probs = trace.get(attnscope.Site("text", 1, "self")).probs
    assert probs.shape == (1, 4, 22, 22)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 4, 22))


def test_vlm_held_out_accuracy(vlm, cards):
    suite, _, enc = _vlm_batch(vlm, 256)
    with torch.no_grad():
        logits = vlm.module(**enc).logits
    last = enc["attention_mask"].sum(1) - 1
    pred = vlm.tokenizer.tokenizer.convert_ids_to_tokens(logits[torch.arange(len(suite)), last].argmax(-1).tolist())
    acc = float(np.mean([p == it.answer_text for p, it in zip(pred, suite)]))
    assert acc >= 0.9 and acc >= cards["shapes-vlm"]["evaluation"]["value"] - 0.05, acc


def test_vlm_readout_heads_attend_to_the_queried_object(vlm, cards):
    suite, scenes, enc = _vlm_batch(vlm, 128, seed=SEED + 1)
    eager = zoo.load_model("shapes-vlm")  # eager attention: output_attentions returns the patterns
    with torch.no_grad():
        att = eager(**enc, output_attentions=True).attentions  # the language model's layers
    last = enc["attention_mask"].sum(1) - 1
    named = _heads(cards["shapes-vlm"]["ground_truth_heads"]["object_readout"])
    for layer, head in named:
        own, other = [], []
        for b, (it, scene) in enumerate(zip(suite, scenes)):
            row = att[layer][b, head, last[b], :16]
            touched = patch_masks(scene.masks, 4).flatten(1) > 0
            own.append(float(row[touched[it.metadata["target"]]].sum()))
            if len(scene.objects) == 2:
                other.append(float(row[touched[1 - it.metadata["target"]]].sum()))
        # the card rule is mass >= 0.3 and >= 2x the other object; fresh items get a 0.05 margin on the mass
        assert np.mean(own) > 0.25 and np.mean(own) > 2 * np.mean(other), (layer, head, np.mean(own), np.mean(other))


def test_visual_heads_analysis_finds_object_focused_heads(vlm, cards):
    """The visual-heads analysis (other code than the card's): its top visual heads look at the queried object
    more densely than at the rest of the image, and so do the card's readout heads."""
    from attnscope.circuits.visual_head_scores import top_visual_heads, visual_heads
    from attnscope.datasets.vlm_example_batches import VLMExample

    suite = shapes_vqa(32, seed=SEED + 2)
    examples = []
    for it in suite:
        scene = scene_of(it)
        enc = vlm.tokenizer(text=[f"<image> {it.text}"], images=[scene.image], return_tensors="pt")
        target = patch_masks(scene.masks, 4)[it.metadata["target"]] > 0
        examples.append(VLMExample(enc["input_ids"][0], enc["pixel_values"], target_patches=target))
    table = visual_heads(vlm, examples, queries="last")
    ratio = {(int(r.layer), int(r.head)): r.value for r in table.df[table.df.metric == "target_ratio"].itertuples()}
    for head in top_visual_heads(table, k=3):
        assert ratio[head] > 1.5, (head, ratio[head])
    for head in _heads(cards["shapes-vlm"]["ground_truth_heads"]["object_readout"]):
        assert ratio[head] > 2.0, (head, ratio[head])


# ---- diffusion -----------------------------------------------------------------------------------------------------

def test_diffusion_loads_validates_and_captures_every_step(pipe):
    from attnscope.zoo.shapes_pipeline import ShapesDiffusionPipeline

    assert isinstance(pipe, ShapesDiffusionPipeline) and pipe.vae_scale_factor == 1
    report = validate(attnscope.load("zoo:shapes-diffusion"))
    assert report.ok, str(report)
    trace = attnscope.capture(pipe, {"prompt": "red circle left blue square right", "num_inference_steps": 10,
                                     "guidance_scale": 3.0, "generator": torch.Generator().manual_seed(0)})
    cross = [s for s in trace.sites if s.kind == "cross"]
    assert len(cross) == 4
    assert trace.tokens.grid == (16, 16)
    for site in cross:
        assert trace.steps(site) == list(range(10))
        probs = trace.get(site, 9).probs
        assert probs.shape == (1, 4, 64, 8)  # conditional half only; 8x8 grid x 8 text tokens
        torch.testing.assert_close(probs.sum(-1), torch.ones(1, 4, 64))


def _samples(pipe, scenes, seed):
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(scenes))]
    return pipe([s.caption for s in scenes], num_inference_steps=10, guidance_scale=3.0, generator=gens,
                output_type="pt").images


def test_diffusion_samples_show_the_prompt(pipe, classifier, cards):
    """Classifier-read (colour, shape) per image half vs the prompt. The shipped organism is weak (card: ~0.23 of
    halves right, chance 0.05), so the bar is 3x chance plus agreement with the card, not "most of the time"."""
    scenes = [make_scene(SEED + 2, i) for i in range(96)]
    hit = (_read(classifier, _samples(pipe, scenes, SEED)) == _truth(scenes)).all(-1)
    acc = float(hit.float().mean())
    card = cards["shapes-diffusion"]["evaluation"]["value"]
    assert cards["shapes-classifier"]["evaluation"]["diffusion_samples"]["half_accuracy"] == card
    assert acc >= 0.15 and acc >= card - 0.1, (acc, card)


def _colour_mask(image01, color):
    """Pixels of a sample within 0.35 of ``color`` in every channel (the object as it was generated)."""
    rgb = torch.tensor(COLORS[color], dtype=torch.float32)[:, None, None] / 255
    return ((image01 - rgb).abs() < 0.35).all(0)


def test_daam_maps_of_colour_words_fall_on_their_objects(pipe):
    """DAAM (circuits.daam) of each colour word in two-object prompts is hotter on the pixels the sample drew in
    that colour than on the other object's pixels."""
    from attnscope.circuits.daam import daam_maps

    scenes = [s for s in (make_scene(SEED + 3, i) for i in range(40)) if len(s.objects) == 2][:10]
    wins, total = 0, 0
    for i, scene in enumerate(scenes):
        words = [o.color for o in scene.objects]
        result = daam_maps(pipe, [scene.caption], words, seed=SEED + i, num_inference_steps=10, guidance_scale=3.0)
        image = (result.trace.output.images[0].clamp(-1, 1) + 1) / 2  # pixel space: the "latent" is the image
        assert result.maps.shape == (1, 2, 16, 16)
        masks = [_colour_mask(image, c) for c in words]
        if min(int(m.sum()) for m in masks) < 3:
            continue  # the sample lacks one of the objects: nothing to compare
        for j in range(2):
            total += 1
            wins += bool(result.maps[0, j][masks[j]].mean() > result.maps[0, j][masks[1 - j]].mean())
    assert total >= 8 and wins / total >= 0.8, (wins, total)
