"""Synthetic shapes: small RGB images with one or two coloured shapes in the left/right half, their masks,
captions and one-word VQA items. Every scene is deterministic from ``(seed, index)``.

A scene has 1-2 objects on a black background; two objects sit in different halves and differ in both colour and
shape, so every question has one answer. Masks are exactly the pixels drawn for each object (objects never
overlap). Captions name each object as ``colour shape position`` (object order random per scene, so the position
word carries the layout); questions are ``what color is the <shape> ?``, ``what shape is <position> ?``,
``what color is <position> ?`` and ``where is the <shape> ?``.

Example:
    >>> from attnscope.datasets.shapes import shapes_scenes, patch_masks
    >>> scene = shapes_scenes(1, seed=3)[0]
    >>> scene.image.shape, scene.masks.shape[1:]
    ((16, 16, 3), (16, 16))
    >>> bool((scene.image[scene.masks[0]] == scene.objects[0].rgb).all())
    True
    >>> tuple(patch_masks(scene.masks, 4).shape[1:])
    (4, 4)
"""

from dataclasses import dataclass, field

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..errors import InputError
from .suite import PromptItem, PromptSuite

COLORS: dict[str, tuple[int, int, int]] = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
                                           "yellow": (255, 255, 0)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right")
QUESTION_KINDS = ("color_of_shape", "shape_of_position", "color_of_position", "position_of_shape")
ANSWERS = tuple(COLORS) + SHAPES + POSITIONS
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>", "<image>")
WORDS = ("what", "color", "shape", "is", "the", "where", "?") + ANSWERS


def vocabulary() -> dict[str, int]:
    """Word-level vocabulary shared by the shapes organisms: special tokens first, then every word."""
    return {tok: i for i, tok in enumerate(SPECIAL_TOKENS + WORDS)}


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object: colour, shape, image half, and bounding box ``(row, col, size)`` in pixels."""

    color: str
    shape: str
    position: str
    box: tuple[int, int, int]

    @property
    def rgb(self) -> np.ndarray:
        return np.array(COLORS[self.color], dtype=np.uint8)


@dataclass(frozen=True)
class VQAItem:
    """A one-word question about object ``target`` of its scene."""

    question: str
    answer: str
    kind: str
    target: int


@dataclass
class ShapesScene:
    """An image ``[H, W, 3]`` uint8, its objects, per-object masks ``[object, H, W]``, caption and questions."""

    image: np.ndarray
    objects: list[ShapeObject]
    masks: np.ndarray
    caption: str
    questions: list[VQAItem] = field(default_factory=list)
    seed: tuple[int, int] = (0, 0)

    def object_at(self, position: str) -> int | None:
        return next((i for i, o in enumerate(self.objects) if o.position == position), None)


def shape_mask(shape: str, box: tuple[int, int, int], image_size: int) -> np.ndarray:
    """Boolean ``[H, W]`` mask of ``shape`` inside the square box ``(row, col, size)``."""
    row, col, size = box
    ys, xs = np.mgrid[0:size, 0:size].astype(float) + 0.5
    if shape == "square":
        inside = np.ones((size, size), dtype=bool)
    elif shape == "circle":
        inside = (ys - size / 2) ** 2 + (xs - size / 2) ** 2 <= (size / 2) ** 2
    elif shape == "triangle":  # apex up: half-width grows linearly from the top row to the base
        inside = np.abs(xs - size / 2) <= ys / 2
    else:
        raise InputError("unknown shape", expected=" | ".join(SHAPES), got=shape)
    mask = np.zeros((image_size, image_size), dtype=bool)
    mask[row:row + size, col:col + size] = inside
    return mask


def _place(rng: np.random.Generator, position: str, image_size: int) -> tuple[int, int, int]:
    half = image_size // 2
    size = int(rng.integers(max(3, image_size * 5 // 16), max(4, image_size * 7 // 16) + 1))
    col0 = 0 if position == "left" else half
    return int(rng.integers(0, image_size - size + 1)), col0 + int(rng.integers(0, half - size + 1)), size


def caption_of(objects: list[ShapeObject], order: list[int] | None = None) -> str:
    """``"red circle left blue square right"``: each object's colour, shape and position, in ``order``."""
    order = list(range(len(objects))) if order is None else order
    return " ".join(f"{objects[i].color} {objects[i].shape} {objects[i].position}" for i in order)


def questions_of(objects: list[ShapeObject]) -> list[VQAItem]:
    """Every question of the four kinds about every object (answers are unique by construction)."""
    out = []
    for i, o in enumerate(objects):
        out += [VQAItem(f"what color is the {o.shape} ?", o.color, "color_of_shape", i),
                VQAItem(f"what shape is {o.position} ?", o.shape, "shape_of_position", i),
                VQAItem(f"what color is {o.position} ?", o.color, "color_of_position", i),
                VQAItem(f"where is the {o.shape} ?", o.position, "position_of_shape", i)]
    return out


def make_scene(seed: int, index: int = 0, image_size: int = 16, min_objects: int = 1,
               max_objects: int = 2) -> ShapesScene:
    """Scene ``index`` of ``seed``: 1-2 objects in distinct halves with distinct colours and shapes."""
    if image_size < 8 or image_size % 2 or not 1 <= min_objects <= max_objects <= 2:
        raise InputError("bad shapes settings", expected="even image_size >= 8, 1 <= min <= max <= 2 objects",
                         got=f"image_size={image_size}, objects={min_objects}..{max_objects}")
    rng = np.random.default_rng([seed, index])
    n = int(rng.integers(min_objects, max_objects + 1))
    positions = list(rng.permutation(POSITIONS)[:n])
    colors = rng.choice(list(COLORS), size=n, replace=False)
    shapes = rng.choice(SHAPES, size=n, replace=False)
    objects = [ShapeObject(str(c), str(s), str(p), _place(rng, str(p), image_size))
               for c, s, p in zip(colors, shapes, positions)]
    image = np.zeros((image_size, image_size, 3), dtype=np.uint8)
    masks = np.stack([shape_mask(o.shape, o.box, image_size) for o in objects])
    for o, m in zip(objects, masks):
        image[m] = o.rgb
    caption = caption_of(objects, [int(i) for i in rng.permutation(n)])
    return ShapesScene(image, objects, masks, caption, questions_of(objects), (int(seed), int(index)))


def shapes_scenes(n: int, seed: int = 0, image_size: int = 16, min_objects: int = 1,
                  max_objects: int = 2) -> list[ShapesScene]:
    """``n`` scenes, scene ``i`` drawn from ``(seed, i)``."""
    return [make_scene(seed, i, image_size, min_objects, max_objects) for i in range(n)]


def shapes_vqa(n: int, seed: int = 0, image_size: int = 16, min_objects: int = 1, max_objects: int = 2,
               kinds: tuple[str, ...] = QUESTION_KINDS) -> PromptSuite:
    """One question per scene (kind drawn uniformly from ``kinds``) as a PromptSuite.

    Each item's ``text`` is the question and ``metadata`` holds the answer, kind, target object index and the
    ``scene`` ``[seed, index]`` that ``scene_of`` redraws (images do not go into the JSON suite).
    """
    rng = np.random.default_rng([seed, 1 << 20])
    items = []
    for i, scene in enumerate(shapes_scenes(n, seed, image_size, min_objects, max_objects)):
        kind = kinds[int(rng.integers(len(kinds)))]
        pool = [q for q in scene.questions if q.kind == kind]
        q = pool[int(rng.integers(len(pool)))]
        items.append(PromptItem(text=q.question, answer_text=q.answer, label=ANSWERS.index(q.answer),
                                metadata={"answer": q.answer, "kind": q.kind, "target": q.target,
                                          "scene": [seed, i], "caption": scene.caption}))
    params = {"n_items": n, "image_size": image_size, "min_objects": min_objects, "max_objects": max_objects,
              "kinds": list(kinds)}
    return PromptSuite("shapes_vqa", items, seed=seed, generator="shapes_vqa", params=params)


def scene_of(item: PromptItem, image_size: int = 16, min_objects: int = 1, max_objects: int = 2) -> ShapesScene:
    """The scene a ``shapes_vqa`` item asks about (pass the suite's settings)."""
    seed, index = item.metadata["scene"]
    return make_scene(int(seed), int(index), image_size, min_objects, max_objects)


def patch_masks(masks: Bool[Tensor, "object height width"] | np.ndarray,
                grid: int | tuple[int, int]) -> Float[Tensor, "object grid_h grid_w"]:
    """Fraction of each grid cell covered by each mask (image size divisible by the grid).

    ``grid`` is the ViT patch grid (``image_size // patch_size``) or a latent grid (``image_size // vae_scale``).
    """
    m = torch.as_tensor(np.asarray(masks)).float()
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    _, h, w = m.shape
    if h % gh or w % gw:
        raise InputError("grid does not divide the image", expected=f"a divisor of {h}x{w}", got=f"{gh}x{gw}",
                         fix="pick image_size // patch_size")
    return m.reshape(m.shape[0], gh, h // gh, gw, w // gw).mean(dim=(2, 4))


def to_tensor(images: np.ndarray | list[np.ndarray]) -> Float[Tensor, "batch channel height width"]:
    """uint8 ``[.., H, W, 3]`` images as floats in [-1, 1], channels first."""
    arr = np.asarray(images)
    arr = arr[None] if arr.ndim == 3 else arr
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0
