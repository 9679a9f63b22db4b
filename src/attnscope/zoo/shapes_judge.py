"""The shapes classifier as a judge: its model class, loading, and how its readings are scored against scenes.

The ``shapes-classifier`` organism (``attnscope.zoo.shapes_classifier``) trains it; the ``shapes-diffusion``
organism is judged by it. Both import this module, so neither imports the other's training code.

Example:
    >>> import torch
    >>> from attnscope.datasets.shapes import make_scene
    >>> from attnscope.zoo.shapes_judge import ShapesClassifier, predict, targets
    >>> targets([make_scene(0, 1)]).tolist(), tuple(predict(ShapesClassifier(), torch.zeros(2, 3, 16, 16)).shape)
    ([[[3, 1], [4, 2]]], (2, 2, 2))
"""

import json
from pathlib import Path

import torch
from jaxtyping import Float, Int
from safetensors.torch import load_file
from torch import Tensor, nn

from ..datasets.shapes import COLORS, POSITIONS, SHAPES, ShapesScene

COLOR_CLASSES = ("none",) + tuple(COLORS)
SHAPE_CLASSES = ("none",) + SHAPES



class ShapesClassifier(nn.Module):
    """Two conv stages and an MLP; logits ``[batch, position, class]`` for colour and shape."""

    def __init__(self, image_size: int = 16, channels: tuple[int, int] = (32, 64), hidden: int = 128):
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(nn.Conv2d(3, c1, 3, padding=1), nn.ReLU(), nn.Conv2d(c1, c1, 3, padding=1),
                                      nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU())
        n_out = len(POSITIONS) * (len(COLOR_CLASSES) + len(SHAPE_CLASSES))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c2 * (image_size // 2) ** 2, hidden), nn.ReLU(),
                                  nn.Linear(hidden, n_out))

    def forward(self, images: Float[Tensor, "batch 3 height width"]) -> tuple[Tensor, Tensor]:
        out = self.head(self.features(images)).reshape(images.shape[0], len(POSITIONS), -1)
        return out[..., :len(COLOR_CLASSES)], out[..., len(COLOR_CLASSES):]


def targets(scenes: list[ShapesScene]) -> Int[Tensor, "batch position 2"]:
    """Per scene and half: ``[colour class, shape class]`` (0 = nothing there)."""
    out = torch.zeros(len(scenes), len(POSITIONS), 2, dtype=torch.long)
    for b, scene in enumerate(scenes):
        for o in scene.objects:
            p = POSITIONS.index(o.position)
            out[b, p] = torch.tensor([COLOR_CLASSES.index(o.color), SHAPE_CLASSES.index(o.shape)])
    return out


@torch.no_grad()
def predict(model: nn.Module, images: Float[Tensor, "batch 3 height width"]) -> Int[Tensor, "batch position 2"]:
    """Predicted ``[colour class, shape class]`` per half of images in [-1, 1]."""
    model.eval()
    color, shape = model(images)
    return torch.stack([color.argmax(-1), shape.argmax(-1)], dim=-1)


def agreement(model: nn.Module, images: Float[Tensor, "batch 3 height width"],
              target: Int[Tensor, "batch position 2"]) -> dict[str, float]:
    """``half_accuracy`` (colour and shape both right), ``color_accuracy``, ``shape_accuracy`` (per half) and
    ``scene_accuracy`` (every half right)."""
    pred = predict(model, images)
    hit = pred == target
    both = hit.all(-1)
    return {"half_accuracy": round(float(both.float().mean()), 4),
            "color_accuracy": round(float(hit[..., 0].float().mean()), 4),
            "shape_accuracy": round(float(hit[..., 1].float().mean()), 4),
            "scene_accuracy": round(float(both.all(-1).float().mean()), 4)}


def load(path: str | Path) -> ShapesClassifier:
    """The classifier saved in ``path`` (config.json + model.safetensors)."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    model = ShapesClassifier(cfg["image_size"], tuple(cfg["channels"]), cfg["hidden"])
    model.load_state_dict(load_file(str(Path(path) / "model.safetensors")))
    return model.eval()
