"""``shapes-diffusion``: a pixel-space text-to-image diffusion model (UNet2DConditionModel, 4 cross-attention
layers x 4 heads on the 8x8 grid of a 16x16 image) with a CLIPTextModel trained jointly from scratch on
``attnscope.datasets.shapes`` captions ("red circle left blue square right").

The pipeline is ``ShapesDiffusionPipeline`` (unet, text_encoder, word-level tokenizer, DDIM scheduler; no VAE,
``vae_scale_factor = 1``; the UNet also gets two coordinate channels, since it has no position embeddings),
trained with epsilon prediction and 10% caption dropout so classifier-free guidance works; the shipped weights are
an exponential moving average. The text encoder's token and position embeddings start at std 0.3 (CLIP's 0.02 left
the first word's output nearly the same for every colour, so prompts barely steered the samples). Sample quality is
measured with the ``shapes-classifier`` organism: each image half's predicted colour and shape against the prompt.

Ground truth (teacher-forced): real held-out scenes are noised to several timesteps and denoised once with their
caption; a cross-attention head localises when, for each object's colour and shape words, the head's map over the
pixels puts its mass on that object's mask. Heads whose mean mass inside the mask is >= 2x the mask's area (what a
uniform map would score, ~0.1) are the ``object_localising`` heads.
"""

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..datasets.shapes import make_scene, patch_masks
from ..probes.capturing import capture
from . import load_model
from ._card import write_card
from ._common import seed_everything, step_seed, torch_threads, train_loop
from ._meta import base_card, describe
from ._shapes import images_of, scene_batch
from .shapes_judge import agreement, targets
from .shapes_pipeline import ShapesDiffusionPipeline, build_components

SPEC = {"name": "shapes-diffusion", "task": "text-to-image generation of 16x16 shapes scenes from captions",
        "architecture": "ShapesDiffusionPipeline", "auto_class": "DiffusionPipeline"}
SPEC["description"] = describe((__doc__ or "").split("Example:")[0])
SEED = 0
STEPS = 2400
HELDOUT_SEED = 1_000_021
HP: dict[str, Any] = {"image_size": 16, "channels": [32, 64], "layers_per_block": 1, "groups": 8, "n_heads": 4,
                      "text_d": 64, "text_layers": 2, "text_len": 8, "train_timesteps": 1000,
                      "beta_schedule": "squaredcos_cap_v2", "batch_size": 32, "lr": 1e-3, "warmup": 100,
                      "text_embed_std": 0.3,
                      "coord_channels": 2,
                      "caption_dropout": 0.1, "ema_decay": 0.995, "attention_grid": 8}
SAMPLING = {"num_inference_steps": 10, "guidance_scale": 3.0}
THRESHOLD_RATIO = 2.0  # a head localises when its mask mass is >= 2x a uniform map's (the mask area)
NOISE_STEPS = (100, 300, 500, 700)


class _Pair(nn.Module):
    """The trained parts as one module (one optimiser)."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder


def _captions(scenes: list, rng: np.random.Generator, dropout: float) -> list[str]:
    return ["" if rng.random() < dropout else s.caption for s in scenes]


def fit(seed: int = SEED, steps: int = STEPS, init: ShapesDiffusionPipeline | None = None,
        lr: float | None = None, offset: int = 0) -> tuple[ShapesDiffusionPipeline, dict[str, Any]]:
    """Train from ``seed`` (or continue ``init`` with data steps ``offset ..``); returns the pipeline with EMA
    weights and the training log."""
    with torch_threads(1):
        seed_everything(seed + offset)
        parts = build_components(HP, seed) if init is None else dict(init.components)
        pipe = ShapesDiffusionPipeline(**parts)
        pair = _Pair(parts["unet"], parts["text_encoder"])
        ema = [p.detach().clone() for p in pair.parameters()]
        sched = parts["scheduler"]

        def loss_fn(m: nn.Module, step: int) -> torch.Tensor:
            decay = min(HP["ema_decay"], (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(ema, m.parameters()):
                    e.mul_(decay).add_(p.detach(), alpha=1 - decay)
            s = step_seed(seed, offset + step)
            scenes = scene_batch(s, HP["batch_size"], image_size=HP["image_size"])
            gen = torch.Generator().manual_seed(s)
            x0 = images_of(scenes)
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, HP["train_timesteps"], (len(scenes),), generator=gen)
            emb = m.text_encoder(input_ids=pipe.tokenize(_captions(scenes, np.random.default_rng(s),
                                                                   HP["caption_dropout"]))).last_hidden_state
            pred = m.unet(pipe.unet_input(sched.add_noise(x0, noise, t)), t, encoder_hidden_states=emb).sample
            return F.mse_loss(pred, noise)

        log = train_loop(pair, loss_fn, steps=steps, lr=lr or HP["lr"], warmup=HP["warmup"],
                         desc="shapes-diffusion", log_every=100)
        with torch.no_grad():
            for e, p in zip(ema, pair.parameters()):
                p.copy_(e)
    pipe.set_progress_bar_config(disable=True)
    return pipe, log


def sample(pipe: ShapesDiffusionPipeline, prompts: list[str], seed: int, batch: int = 64) -> torch.Tensor:
    """``[n, 3, H, W]`` samples in [0, 1], one seeded generator per prompt (``seed + i``), SAMPLING settings."""
    out = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        out.append(pipe(chunk, generator=gens, output_type="pt", **SAMPLING).images)
    return torch.cat(out)


def sample_accuracy(pipe: ShapesDiffusionPipeline, classifier: nn.Module, n: int = 256,
                    seed: int = HELDOUT_SEED) -> dict[str, float]:
    """Classifier-judged agreement of samples with their prompts (captions of held-out scenes)."""
    scenes = [make_scene(seed, i, HP["image_size"]) for i in range(n)]
    images = sample(pipe, [s.caption for s in scenes], seed)
    return agreement(classifier, images * 2 - 1, targets(scenes))


def head_localisation(pipe: ShapesDiffusionPipeline, n: int = 48, seed: int = HELDOUT_SEED + 1) -> dict[str, Any]:
    """Per cross-attention head: mean attention mass inside the object's mask for its colour and shape words.

    Real scenes, noised to each of NOISE_STEPS, one UNet call with the caption; maps are the head's attention
    from every pixel of its grid to the word, normalised over pixels. Returns ``{"scores": {head: score},
    "area": mean mask area fraction (the score of a head that ignores the image)}``.
    """
    scenes = [make_scene(seed, i, HP["image_size"]) for i in range(n)]
    x0 = images_of(scenes)
    ids = pipe.tokenize([s.caption for s in scenes])
    words = [pipe.tokenizer.convert_ids_to_tokens(row) for row in ids.tolist()]
    with torch.no_grad():
        emb = pipe.text_encoder(input_ids=ids).last_hidden_state
    totals: dict[str, list[float]] = {}
    area: list[float] = []
    for t in NOISE_STEPS:
        gen = torch.Generator().manual_seed(seed + t)
        noisy = pipe.scheduler.add_noise(x0, torch.randn(x0.shape, generator=gen), torch.full((n,), t))
        trace = capture(pipe.unet, {"sample": pipe.unet_input(noisy), "timestep": torch.tensor(t),
                                              "encoder_hidden_states": emb}, sites=lambda s: s.kind == "cross")
        for site in trace.sites:
            probs = trace.get(site).probs  # [batch, head, query, key]
            grid = int(round(probs.shape[2] ** 0.5))
            for b, scene in enumerate(scenes):
                masks = patch_masks(scene.masks, grid).flatten(1)  # [object, cells]
                for o, obj in enumerate(scene.objects):
                    for w in (words[b].index(obj.color), words[b].index(obj.shape)):
                        m = probs[b, :, :, w]
                        inside = (m * masks[o]).sum(-1) / m.sum(-1).clamp_min(1e-12)
                        for h in range(probs.shape[1]):
                            totals.setdefault(f"{site.tower}.L{site.layer}H{h}", []).append(float(inside[h]))
                        if site == trace.sites[0]:
                            area.append(float(masks[o].mean()))
    return {"scores": {k: round(float(np.mean(v)), 4) for k, v in totals.items()},
            "area": round(float(np.mean(area)), 4)}


def load(path: str | Path) -> ShapesDiffusionPipeline:
    """The saved pipeline (progress bars off)."""
    pipe = ShapesDiffusionPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def train(out_dir: str | Path, seed: int = SEED, steps: int = STEPS) -> Path:
    """Train from ``seed``, save the pipeline and training log, then measure and write the card."""
    pipe, log = fit(seed, steps)
    out = Path(out_dir)
    pipe.save_pretrained(out)
    (out / "training_log.json").write_text(json.dumps({"seed": seed, **log}) + "\n")
    return finish(out)


def finish(out_dir: str | Path) -> Path:
    """Measure the saved pipeline (needs the shipped ``shapes-classifier``) and write its card."""
    out = Path(out_dir)
    log = json.loads((out / "training_log.json").read_text())
    pipe = load(out)
    with torch_threads(1):
        acc = sample_accuracy(pipe, load_model("shapes-classifier"))
        loc = head_localisation(pipe)
    pair = _Pair(pipe.unet, pipe.text_encoder)
    card = base_card(SPEC, pair, log["seed"], log, HP, data={"generator": "shapes_scenes", "params":
                     {"image_size": HP["image_size"], "min_objects": 1, "max_objects": 2}})
    card["architecture"].update({"unet": "UNet2DConditionModel, pixel space 3x16x16 (+2 coordinate input "
                                 "channels), blocks (32, 64), cross-attention in down.1, mid, up.0 (x2) at 8x8, "
                                 "4 heads each",
                                 "text_encoder": f"CLIPTextModel {HP['text_layers']} layers, d={HP['text_d']}",
                                 "n_cross_attention_layers": 4, "n_heads": HP["n_heads"]})
    card["training"]["ema_decay"] = HP["ema_decay"]
    card["evaluation"] = {"metric": "fraction of image halves whose classifier-predicted (colour, shape) matches "
                          "the prompt ('none' for an empty half)", "value": acc["half_accuracy"],
                          **{k: v for k, v in acc.items() if k != "half_accuracy"}, "n_items": 256,
                          "seed": HELDOUT_SEED, "sampling": SAMPLING, "chance": 0.05,
                          "scorer": "shapes-classifier"}
    gt = [h for h, v in loc["scores"].items() if v >= THRESHOLD_RATIO * loc["area"]]
    card["ground_truth_heads"] = {"object_localising": gt}
    card["ground_truth_rules"] = {"object_localising": f"cross-attention heads whose map for an object's colour "
                                  f"and shape words puts >= {THRESHOLD_RATIO}x the mask area ({loc['area']}, what "
                                  f"a uniform map scores) of its mass inside the object's mask (mean over "
                                  f"{len(NOISE_STEPS)} noise levels {list(NOISE_STEPS)})"}
    card["head_scores"] = {"mask_mass": loc["scores"]}
    card["ablation"] = {}
    card["notes"] = [f"Samples: DDIM {SAMPLING['num_inference_steps']} steps, guidance {SAMPLING['guidance_scale']}, "
                     "generator seeded per prompt.", "Heads are named <tower>.L<layer>H<head> with the "
                     "PipelineAdapter's towers (attnscope.Site(tower, layer, 'cross')).",
                     "No head ablation study: zero_ablate_heads covers transformers models only.",
                     "Weak organism: samples are clean shapes, and colour words steer them somewhat, but positions "
                     "and object counts follow the prompt only a little above chance (see evaluation); cross-"
                     "attention of object words does land on the objects (teacher-forced scores above, DAAM maps "
                     "of colour words in tests/models/test_shapes_zoo.py)."]
    write_card(out, card)
    return out
