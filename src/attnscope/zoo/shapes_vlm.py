"""``shapes-vlm``: a tiny LLaVA (LlavaForConditionalGeneration: a 2-layer CLIPVisionModel on 16x16 images with 4x4
patches and a [CLS] token, a 2-layer MLP projector, a 2-layer Llama) trained from scratch to answer one-word
questions about ``attnscope.datasets.shapes`` scenes: "what color is the square ?", "what shape is left ?",
"what color is right ?", "where is the circle ?".

The sequence is 16 image tokens (patch features; the [CLS] feature is dropped, strategy ``default``) followed by
the question; the answer is read from the logits of the last token. The folder ships a ``LlavaProcessor``
(CLIPImageProcessor without resizing, normalised to [-1, 1]; a word-level fast tokenizer that knows ``<image>``)
so that ``attnscope.capture(model, ("what color is the square ?", image))`` works.

Initialisation matters at this width: with transformers' default std 0.02 the Llama and projector weights shrink
every signal ~6x per matrix (d=64) and the model sits near 60% for thousands of steps (colour of the only object
right, left/right and shapes at the prior); std 0.1 (about 1/sqrt(d)) for them and std 0.3 for the vision position
embeddings (CLIP's 0.02 leaves patch positions faint) learn the task in a few thousand steps.

Ground truth: per language-model head, the attention mass from the last token onto the image tokens of the
queried object's patches (patches the object's mask touches) and onto the other object's patches. Heads with
queried-object mass >= 0.3 and at least twice the other object's are the ``object_readout`` heads; a key-vs-random
zero-ablation study tests whether they are needed (the card says what it found).

Example:
    >>> from attnscope.zoo.shapes_vlm import encode, n_image_tokens, processor
    >>> ids, mask = encode(["what color is the square ?"])
    >>> n_image_tokens(), ids.shape[1]
    (16, 22)
    >>> processor().tokenizer.convert_ids_to_tokens(ids[0, 15:].tolist())
    ['<image>', 'what', 'color', 'is', 'the', 'square', '?']
"""

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..datasets.shapes import QUESTION_KINDS, ShapesScene, make_scene, patch_masks, vocabulary
from ._analysis import ablation_studies
from ._card import write_card
from ._common import head_name, save_checkpoint, scores_table, seed_everything, step_seed, torch_threads, train_loop
from ._meta import base_card, describe
from ._shapes import images_of, word_tokenizer

SPEC = {"name": "shapes-vlm", "task": "one-word visual question answering on 16x16 shapes scenes",
        "architecture": "LlavaForConditionalGeneration", "auto_class": "AutoModelForImageTextToText"}
SPEC["description"] = describe((__doc__ or "").split("Example:")[0])
SEED = 0
STEPS = 4000
HELDOUT_SEED = 1_000_011
HP: dict[str, Any] = {"image_size": 16, "patch_size": 4, "vision_d": 64, "vision_layers": 2, "d_model": 64,
                      "n_layers": 2, "n_heads": 4, "batch_size": 64, "lr": 1e-3, "warmup": 100, "max_positions": 64,
                      "vision_pos_std": 0.3, "text_init_std": 0.1}
THRESHOLDS = {"mass": 0.3, "ratio": 2.0}


def config() -> Any:
    import transformers

    vocab = vocabulary()
    vision = transformers.CLIPVisionConfig(hidden_size=HP["vision_d"], intermediate_size=2 * HP["vision_d"],
                                           num_hidden_layers=HP["vision_layers"], num_attention_heads=HP["n_heads"],
                                           image_size=HP["image_size"], patch_size=HP["patch_size"], num_channels=3)
    text = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=HP["d_model"],
                                    intermediate_size=2 * HP["d_model"], num_hidden_layers=HP["n_layers"],
                                    num_attention_heads=HP["n_heads"], num_key_value_heads=HP["n_heads"],
                                    max_position_embeddings=HP["max_positions"], bos_token_id=vocab["<bos>"],
                                    eos_token_id=vocab["<eos>"], pad_token_id=vocab["<pad>"],
                                    tie_word_embeddings=False, initializer_range=HP["text_init_std"])
    return transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=vocab["<image>"],
                                    vision_feature_layer=-1, vision_feature_select_strategy="default",
                                    image_seq_length=n_image_tokens(), tie_word_embeddings=False)


def n_image_tokens() -> int:
    return (HP["image_size"] // HP["patch_size"]) ** 2


def build_model(seed: int = SEED) -> nn.Module:
    import transformers

    seed_everything(seed)
    model = transformers.LlavaForConditionalGeneration(config())
    model.set_attn_implementation("eager")
    with torch.no_grad():  # CLIP's init (std 0.02) leaves patch positions too faint to learn left/right or shapes
        model.model.vision_tower.embeddings.position_embedding.weight.normal_(0.0, HP["vision_pos_std"])
    return model


def processor() -> Any:
    """The LlavaProcessor shipped with the checkpoint (built in memory)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    images = CLIPImageProcessor(do_resize=False, do_center_crop=False, do_rescale=True, rescale_factor=1 / 255,
                                do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3, do_convert_rgb=True,
                                size={"shortest_edge": HP["image_size"]},
                                crop_size={"height": HP["image_size"], "width": HP["image_size"]})
    return LlavaProcessor(image_processor=images, tokenizer=word_tokenizer(HP["max_positions"]),
                          patch_size=HP["patch_size"], vision_feature_select_strategy="default",
                          image_token="<image>", num_additional_image_tokens=1)


def encode(questions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` ``[batch, seq]`` (16 image tokens, then the question; right-padded) and ``attention_mask``."""
    vocab = vocabulary()
    rows = [[vocab["<image>"]] * n_image_tokens() + [vocab[w] for w in q.split()] for q in questions]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), vocab["<pad>"], dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    return ids, mask


def vqa_batch(seed: int, n: int) -> tuple[list[ShapesScene], list[Any]]:
    """``n`` scenes of ``seed`` with one question each (kind uniform, then object uniform)."""
    rng = np.random.default_rng([seed, 7])
    scenes = [make_scene(seed, i, HP["image_size"]) for i in range(n)]
    items = []
    for scene in scenes:
        kind = QUESTION_KINDS[int(rng.integers(len(QUESTION_KINDS)))]
        pool = [q for q in scene.questions if q.kind == kind]
        items.append(pool[int(rng.integers(len(pool)))])
    return scenes, items


def tensors(seed: int, n: int) -> dict[str, Any]:
    scenes, items = vqa_batch(seed, n)
    ids, mask = encode([q.question for q in items])
    vocab = vocabulary()
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": images_of(scenes),
            "answer": torch.tensor([vocab[q.answer] for q in items]), "last": mask.sum(1) - 1,
            "scenes": scenes, "items": items}


def answer_logits(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"])
    return out.logits[torch.arange(len(batch["last"])), batch["last"]]


@torch.no_grad()
def accuracy(model: nn.Module, batch: dict[str, Any]) -> float:
    return float((answer_logits(model, batch).argmax(-1) == batch["answer"]).float().mean())


def fit(seed: int = SEED, steps: int = STEPS) -> tuple[nn.Module, dict[str, Any]]:
    with torch_threads(1):
        model = build_model(seed)
        probe = tensors(HELDOUT_SEED + 1, 256)
        curve: list[list[float]] = []

        def loss_fn(m: nn.Module, step: int) -> torch.Tensor:
            batch = tensors(step_seed(seed, step), HP["batch_size"])
            return F.cross_entropy(answer_logits(m, batch), batch["answer"])

        def on_log(step: int, _: float) -> None:
            curve.append([step, round(accuracy(model, probe), 4)])
            model.train()

        log = train_loop(model, loss_fn, steps=steps, lr=HP["lr"], warmup=HP["warmup"], desc="shapes-vlm",
                         log_every=200, on_log=on_log)
    log["accuracy_curve"] = curve
    return model, log


@torch.no_grad()
def head_masses(model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``[layer, head]`` mean attention mass from the last token onto the queried object's patches (``queried``),
    the other object's patches (``other``, two-object scenes only) and all image tokens (``image``)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"], output_attentions=True)
    attn = torch.stack(list(out.attentions))  # [layer, batch, head, query, key]: the language model's layers
    grid = HP["image_size"] // HP["patch_size"]
    n_img = n_image_tokens()
    rows = attn.permute(1, 3, 0, 2, 4)[torch.arange(attn.shape[1]), batch["last"]]  # [batch, layer, head, key]
    img = rows[..., :n_img]
    queried, other, n_other = torch.zeros(img.shape[1:3]), torch.zeros(img.shape[1:3]), 0
    for b, (scene, item) in enumerate(zip(batch["scenes"], batch["items"])):
        touched = patch_masks(scene.masks, grid).flatten(1) > 0  # [object, patch]
        queried += img[b][..., touched[item.target]].sum(-1)
        if len(scene.objects) == 2:
            other += img[b][..., touched[1 - item.target]].sum(-1)
            n_other += 1
    n = len(batch["scenes"])
    return {"queried": queried / n, "other": other / max(n_other, 1), "image": img.sum(-1).mean(0)}


def analyze(model: nn.Module, n_items: int = 512, seed: int = HELDOUT_SEED) -> dict[str, Any]:
    batch = tensors(seed, n_items)
    acc = accuracy(model, batch)
    by_kind = {}
    with torch.no_grad():
        hits = answer_logits(model, batch).argmax(-1) == batch["answer"]
    for kind in QUESTION_KINDS:
        sel = torch.tensor([q.kind == kind for q in batch["items"]])
        by_kind[kind] = round(float(hits[sel].float().mean()), 4)
    masses = head_masses(model, batch)
    q, o = masses["queried"], masses["other"]
    gt = [(l, h) for l in range(q.shape[0]) for h in range(q.shape[1])
          if q[l, h] >= THRESHOLDS["mass"] and q[l, h] >= THRESHOLDS["ratio"] * o[l, h]]
    all_heads = [(l, h) for l in range(HP["n_layers"]) for h in range(HP["n_heads"])]
    studies = ablation_studies(model, {"object_readout": gt}, all_heads, lambda m: accuracy(m, batch),
                               metric_name="held-out VQA accuracy", chance=0.25, seed=seed) if gt else {}
    return {"accuracy": acc, "by_kind": by_kind, "n_items": n_items, "seed": seed,
            "scores": {k: scores_table(v) for k, v in masses.items()},
            "ground_truth": {"object_readout": [head_name(*h) for h in gt]}, "ablation": studies}


def train(out_dir: str | Path, seed: int = SEED, steps: int = STEPS) -> Path:
    """Train from ``seed``; write checkpoint, processor and training log to ``out_dir``, then the card."""
    model, log = fit(seed, steps)
    out = save_checkpoint(model, Path(out_dir))
    processor().save_pretrained(out)
    (out / "training_log.json").write_text(json.dumps({"seed": seed, **log}) + "\n")
    return finish(out)


def _ablation_note(ablation: dict[str, Any]) -> str:
    study = ablation.get("key_heads")
    if not study:
        return "No object_readout heads passed the rule, so there is no ablation study."
    verdict = ("the readout is redundant: zero-ablating these heads costs less than ablating as many random "
               "heads (the layer-0 heads that carry the question matter more)"
               if study["key_ablated"] >= study["random_ablated_mean"] else
               "zero-ablating these heads costs more than ablating as many random heads")
    return (f"Ablation: clean {study['clean']}, object_readout heads ablated {study['key_ablated']}, random "
            f"pairs {study['random_ablated_mean']} on average; {verdict}. The heads are ground truth for *where "
            "attention goes* (object localisation), not for necessity.")


def finish(out_dir: str | Path) -> Path:
    """Analyse the saved model and write its card (training provenance from ``training_log.json``)."""
    import transformers

    out = Path(out_dir)
    log = json.loads((out / "training_log.json").read_text())
    model = transformers.LlavaForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
    with torch_threads(1):
        result = analyze(model)
    card = base_card(SPEC, model, log["seed"], log, HP, data={"generator": "shapes_vqa", "params":
                     {"image_size": HP["image_size"], "min_objects": 1, "max_objects": 2,
                      "kinds": list(QUESTION_KINDS)}})
    card["architecture"].update({"vision": f"CLIPVisionModel {HP['vision_layers']} layers x {HP['n_heads']} heads, "
                                 f"d={HP['vision_d']}, patch {HP['patch_size']} ([CLS] + 16 patches)",
                                 "text": f"Llama {HP['n_layers']} layers x {HP['n_heads']} heads, d={HP['d_model']}",
                                 "n_layers": HP["n_layers"], "n_heads": HP["n_heads"],
                                 "image_tokens": n_image_tokens()})
    card["training"]["accuracy_curve [step, acc]"] = log["accuracy_curve"]
    card["evaluation"] = {"metric": "one-word answer accuracy (argmax over the vocabulary at the last token)",
                          "value": round(result["accuracy"], 4), "by_kind": result["by_kind"],
                          "n_items": result["n_items"], "seed": result["seed"], "chance": 0.25}
    card["ground_truth_heads"] = result["ground_truth"]
    card["ground_truth_rules"] = {"object_readout": f"language-model heads whose last-token attention mass on the "
                                  f"queried object's patches is >= {THRESHOLDS['mass']} and >= "
                                  f"{THRESHOLDS['ratio']}x the mass on the other object's patches"}
    card["head_scores"] = result["scores"]
    card["ablation"] = result["ablation"]
    card["notes"] = ["Head names count language-model layers (the vision tower's heads are not scored).",
                     "Chance is 0.25 for colour questions, 1/3 for shape, 1/2 for position.",
                     _ablation_note(result["ablation"])]
    write_card(out, card)
    return out
