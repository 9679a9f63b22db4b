"""``shapes-classifier``: a small CNN that reads a 16x16 shapes image and names, for each half (left, right), the
colour (none/red/green/blue/yellow) and the shape (none/circle/square/triangle) drawn there.

It is the scorer of the other shapes organisms (it replaces CLIP in the HRV-style checks): the diffusion
organism's samples are judged by whether the classifier reads back what the prompt asked for. Trained on dataset
images with additive Gaussian noise (std up to 0.15 in [-1, 1] units) so that slightly noisy samples still read.
No attention: it has no ground-truth heads.

Example:
    >>> import torch
    >>> from attnscope.datasets.shapes import make_scene
    >>> from attnscope.zoo.shapes_classifier import build_model, predict, targets
    >>> scene = make_scene(0, 1)
    >>> scene.caption, targets([scene]).tolist()
    ('blue circle left yellow square right', [[[3, 1], [4, 2]]])
    >>> tuple(predict(build_model(), torch.zeros(2, 3, 16, 16)).shape)
    (2, 2, 2)
"""

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ..datasets.shapes import POSITIONS, make_scene
from ..errors import ModelNotFoundError
from . import checkpoint_path, shapes_diffusion as sd
from ._card import write_card
from ._common import seed_everything, step_seed, torch_threads, train_loop
from ._meta import base_card, describe
from ._shapes import images_of, scene_batch
from .shapes_judge import predict  # (re-exported: the organism's model, loader and scoring)
from .shapes_judge import COLOR_CLASSES, SHAPE_CLASSES, ShapesClassifier, agreement, load, targets  # noqa: F401

SPEC = {"name": "shapes-classifier", "task": "per image half: colour and shape of the object there (or none)",
        "architecture": "ShapesClassifier", "auto_class": "attnscope.zoo.shapes_classifier.ShapesClassifier"}
SPEC["description"] = describe((__doc__ or "").split("Example:")[0])
SEED = 0
STEPS = 800
HELDOUT_SEED = 1_000_031
HP: dict[str, Any] = {"image_size": 16, "channels": [32, 64], "hidden": 128, "batch_size": 64, "lr": 2e-3,
                      "warmup": 50, "noise_std": 0.15}
def build_model(seed: int = SEED) -> ShapesClassifier:
    seed_everything(seed)
    return ShapesClassifier(HP["image_size"], tuple(HP["channels"]), HP["hidden"])


def fit(seed: int = SEED, steps: int = STEPS) -> tuple[ShapesClassifier, dict[str, Any]]:
    """Train from ``seed`` on fresh scenes every step (noise-augmented)."""
    with torch_threads(1):
        model = build_model(seed)

        def loss_fn(m: nn.Module, step: int) -> torch.Tensor:
            s = step_seed(seed, step)
            scenes = scene_batch(s, HP["batch_size"], image_size=HP["image_size"])
            gen = torch.Generator().manual_seed(s)
            x = images_of(scenes)
            std = torch.rand(len(scenes), 1, 1, 1, generator=gen) * HP["noise_std"]
            x = x + std * torch.randn(x.shape, generator=gen)
            color, shape = m(x)
            y = targets(scenes)
            return F.cross_entropy(color.flatten(0, 1), y[..., 0].flatten()) + \
                F.cross_entropy(shape.flatten(0, 1), y[..., 1].flatten())

        log = train_loop(model, loss_fn, steps=steps, lr=HP["lr"], warmup=HP["warmup"], desc="shapes-classifier",
                         log_every=50)
    return model, log


def save(model: ShapesClassifier, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"architectures": ["ShapesClassifier"], "model_type": "attnscope-shapes-classifier",
           "image_size": HP["image_size"], "channels": HP["channels"], "hidden": HP["hidden"],
           "color_classes": list(COLOR_CLASSES), "shape_classes": list(SHAPE_CLASSES), "positions": list(POSITIONS)}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    return out


def heldout_accuracy(model: nn.Module, n: int = 1024, seed: int = HELDOUT_SEED) -> dict[str, float]:
    scenes = [make_scene(seed, i, HP["image_size"]) for i in range(n)]
    return agreement(model, images_of(scenes), targets(scenes))


def train(out_dir: str | Path, seed: int = SEED, steps: int = STEPS) -> Path:
    """Train from ``seed``, save weights and training log, then write the card."""
    model, log = fit(seed, steps)
    out = save(model, out_dir)
    (out / "training_log.json").write_text(json.dumps({"seed": seed, **log}) + "\n")
    return finish(out)


def _diffusion_agreement(model: nn.Module) -> dict[str, Any] | None:
    """Agreement of the shipped diffusion organism's held-out samples with their prompts (None if not trained)."""
    try:
        pipe = sd.load(checkpoint_path("shapes-diffusion"))
    except ModelNotFoundError:
        return None
    return {**sd.sample_accuracy(pipe, model), "n_items": 256, "seed": sd.HELDOUT_SEED, "sampling": sd.SAMPLING}


def finish(out_dir: str | Path) -> Path:
    """Measure the saved classifier on held-out dataset images and diffusion samples; write its card."""
    out = Path(out_dir)
    log = json.loads((out / "training_log.json").read_text())
    model = load(out)
    with torch_threads(1):
        acc = heldout_accuracy(model)
        noisy = heldout_accuracy_noisy(model)
        diffusion = _diffusion_agreement(model)
    card = base_card(SPEC, model, log["seed"], log, HP, data={"generator": "shapes_scenes", "params":
                     {"image_size": HP["image_size"], "min_objects": 1, "max_objects": 2}})
    card["architecture"].update({"layers": "conv3x3(3->32), conv3x3(32->32), maxpool2, conv3x3(32->64), "
                                 "linear(4096->128), linear(128->18)", "outputs": "per half: 5 colour + 4 shape "
                                 "logits"})
    card["evaluation"] = {"metric": "fraction of image halves with colour and shape both right ('none' for an "
                          "empty half)", "value": acc["half_accuracy"],
                          **{k: v for k, v in acc.items() if k != "half_accuracy"}, "n_items": 1024,
                          "seed": HELDOUT_SEED, "chance": 0.05,
                          f"with noise std {HP['noise_std']}": noisy, "diffusion_samples": diffusion}
    card["ground_truth_heads"] = {}
    card["head_scores"] = {}
    card["ablation"] = {}
    card["notes"] = ["diffusion_samples: the shapes-diffusion organism's samples for the captions of held-out "
                     "scenes, scored against their prompts" if diffusion else
                     "diffusion_samples: shapes-diffusion was not trained when this card was written"]
    write_card(out, card)
    return out


def heldout_accuracy_noisy(model: nn.Module, n: int = 1024, seed: int = HELDOUT_SEED) -> dict[str, float]:
    """Held-out accuracy with Gaussian noise of the training augmentation's largest std added."""
    scenes = [make_scene(seed, i, HP["image_size"]) for i in range(n)]
    x = images_of(scenes)
    gen = torch.Generator().manual_seed(seed)
    return agreement(model, x + HP["noise_std"] * torch.randn(x.shape, generator=gen), targets(scenes))

