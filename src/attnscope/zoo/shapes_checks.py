"""Ground-truth checks of the multimodal shapes organisms, shared by the benchmark and the behavioural tests.

- ``teacher_forced_daam``: held-out two-object scenes noised to several timesteps and denoised once with their
  caption (one UNet call per noise level, recorded as steps 0, 1, ...); DAAM maps of each object's words (its colour
  and shape tokens) at image size, with the objects' exact masks. Real images give exact masks, which the weak
  organism's own samples would not (their layouts follow the prompt only a little).
- ``concept_scorer``: a ``shapes-classifier`` score for a colour or shape word: the mean over images of the highest
  probability, over the two image halves, of that class (the scorer of HRV's ordered weakening).

Example:
    >>> from attnscope.zoo.shapes_checks import concept_scorer
    >>> scorer = concept_scorer("red")
    >>> import torch; 0.0 <= scorer(torch.zeros(1, 3, 16, 16)) <= 1.0
    True
"""

from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Bool
from torch import Tensor

from ..circuits.daam import daam_from_trace
from ..datasets.shapes import make_scene
from ..probes.adapter import module_of
from ..probes.capturing import capture
from . import load_model
from ._shapes import images_of
from .shapes_classifier import COLOR_CLASSES, SHAPE_CLASSES

NOISE_LEVELS = (100, 300, 500, 700, 900)


def two_object_scenes(n: int, seed: int, image_size: int = 16) -> list[Any]:
    """The first ``n`` scenes of ``seed`` that hold two objects."""
    out, index = [], 0
    while len(out) < n:
        scene = make_scene(seed, index, image_size)
        index += 1
        if len(scene.objects) == 2:
            out.append(scene)
    return out


def teacher_forced_daam(pipe: Any, scenes: Sequence[Any], noise_levels: Sequence[int] = NOISE_LEVELS,
                        **daam_options: Any) -> tuple[Any, Bool[Tensor, "batch object height width"]]:
    """DAAM result (words ``object0``, ``object1``; steps = noise levels) and the objects' masks."""
    pipe = module_of(pipe)
    x0 = images_of(list(scenes))
    ids = pipe.tokenize([s.caption for s in scenes])
    tokens = [pipe.tokenizer.convert_ids_to_tokens(row) for row in ids.tolist()]
    with torch.no_grad():
        context = pipe.text_encoder(input_ids=ids).last_hidden_state
    with capture(pipe.unet, sites=lambda s: s.kind == "cross") as cap:
        for t in noise_levels:
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(int(t)))
            noisy = pipe.scheduler.add_noise(x0, noise, torch.full((len(scenes),), int(t)))
            with torch.no_grad():
                pipe.unet(pipe.unet_input(noisy), torch.tensor(int(t)), encoder_hidden_states=context)
    positions = [{f"object{o}": [tok.index(obj.color), tok.index(obj.shape)] for o, obj in enumerate(s.objects)}
                 for s, tok in zip(scenes, tokens)]
    size = tuple(x0.shape[-2:])
    result = daam_from_trace(cap.trace, positions, size=size, **daam_options)
    masks = torch.stack([torch.as_tensor(s.masks) for s in scenes])
    return result, masks


def concept_scorer(word: str, classifier: Any = None) -> Callable[[Tensor], float]:
    """``images [n, 3, H, W]`` in [0, 1] -> mean over images of max over halves of P(class ``word``)."""
    model = classifier if classifier is not None else load_model("shapes-classifier")
    kind = 0 if word in COLOR_CLASSES else 1
    index = (COLOR_CLASSES, SHAPE_CLASSES)[kind].index(word)

    def score(images: Tensor) -> float:
        with torch.no_grad():
            logits = model(images.float() * 2 - 1)[kind]  # the classifier takes images in [-1, 1]
        return float(logits.softmax(-1)[..., index].amax(-1).mean())

    return score


__all__ = ["NOISE_LEVELS", "concept_scorer", "teacher_forced_daam", "two_object_scenes"]
