"""The coverage catalogue: architecture name -> (kind, builder), and the inputs each architecture is checked on.

Builders return seeded, random-init models in eval mode, then add N(0, ``NOISE``) to every parameter (seeded):
random inits leave some terms at zero (relative position-bias tables, learned sinks, adaLN-Zero modulations,
biases) and attention nearly uniform, which would hide exactly the terms and edits the checks look at.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from .diffusion_models import DIFFUSION, diffusion_inputs
from .media_models import SPEECH, VISION_ENCODERS, VLMS, vlm_inputs
from .text_models import ENCODER_DECODERS, TEXT_DECODERS, TEXT_ENCODERS, VOCAB

KINDS = ("text-decoder", "text-encoder", "encoder-decoder", "vision-encoder", "speech", "vlm", "diffusion-unet",
         "diffusion-dit", "diffusion-mmdit", "diffusion-video")
NOISE = 0.2


class Architecture(NamedTuple):
    """One row of the matrix: its kind (one of ``KINDS``) and a builder of a tiny random-init model."""

    kind: str
    builder: Callable[[], nn.Module]


def perturbed(builder: Callable[[], nn.Module], std: float = NOISE) -> Callable[[], nn.Module]:
    """``builder`` followed by seeded N(0, std) noise on every floating-point parameter."""
    def build() -> nn.Module:
        model = builder()
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                if p.is_floating_point():
                    p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
        return model
    build.__qualname__ = getattr(builder, "__qualname__", "build")
    return build


def _catalogue() -> dict[str, Architecture]:
    groups: list[tuple[str, dict[str, Callable[[], nn.Module]]]] = [
        ("text-decoder", TEXT_DECODERS), ("text-encoder", TEXT_ENCODERS), ("encoder-decoder", ENCODER_DECODERS),
        ("vision-encoder", VISION_ENCODERS), ("speech", SPEECH), ("vlm", VLMS)]
    out = {name: Architecture(kind, perturbed(build)) for kind, table in groups for name, build in table.items()}
    out.update({name: Architecture(kind, perturbed(build)) for name, (kind, build) in DIFFUSION.items()})
    return out


ARCHITECTURES: dict[str, Architecture] = _catalogue()


# ---- inputs -------------------------------------------------------------------------------------------------------

SEQ = 10


def token_batch(seed: int, length: int = SEQ, pad: int = 3) -> dict[str, torch.Tensor]:
    """2 rows of ``length`` ids in 4..59, the second right-padded by ``pad`` (mask 0)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB - 4, (2, length), generator=gen)
    mask = torch.ones_like(ids)
    if pad:
        mask[1, -pad:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def inputs_for(name: str, model: nn.Module, seed: int = 0) -> dict[str, Any]:
    """Forward kwargs of architecture ``name`` (a batch of 2; padded where the family takes a mask)."""
    kind = ARCHITECTURES[name].kind
    gen = torch.Generator().manual_seed(seed + 100)
    if kind in ("text-decoder", "text-encoder"):
        return token_batch(seed)
    if kind == "encoder-decoder":
        batch = token_batch(seed, length=9)
        start = int(model.config.decoder_start_token_id)
        decoder = torch.cat([torch.full((2, 1), start), token_batch(seed + 1, length=5)["input_ids"]], 1)
        return {**batch, "decoder_input_ids": decoder}
    if kind == "vision-encoder":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=gen)}
    if name == "whisper":
        decoder = torch.cat([torch.full((2, 1), 2), torch.randint(4, VOCAB, (2, 3), generator=gen)], 1)
        return {"input_features": torch.randn(2, 8, 32, generator=gen), "decoder_input_ids": decoder}
    if kind == "speech":
        return {"input_values": torch.randn(2, 400, generator=gen)}
    if kind == "vlm":
        return vlm_inputs(name, model) if seed == 0 else _shifted(vlm_inputs(name, model), seed)
    return diffusion_inputs(name, model) if seed == 0 else _shifted(diffusion_inputs(name, model), seed)


def _shifted(inputs: dict[str, Any], seed: int) -> dict[str, Any]:
    """Another input of the same structure: floating-point tensors redrawn (ids and masks kept)."""
    gen = torch.Generator().manual_seed(seed + 200)
    return {k: torch.randn(v.shape, generator=gen) if torch.is_tensor(v) and v.is_floating_point() and v.ndim > 1
            else v for k, v in inputs.items()}


def token_inputs(inputs: dict[str, Any]) -> bool:
    """True when the model reads token ids (the inputs ``resample`` reference sets are made of)."""
    return "input_ids" in inputs
