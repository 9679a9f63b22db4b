"""``bake_mask`` (what ``attnscope prune`` saves) on families edited through the attention route: the zeroed input
columns of the layers that read the head outputs (BLOOM ``dense``, GPT-Neo ``out_proj``, SD3 ``to_out[0]`` and
``to_add_out``) give the outputs of plain forward pre-hooks zeroing those heads' slices, written here."""

import copy
from contextlib import ExitStack

import pytest
import torch

from attnscope.circuits.structural import bake_mask
from attnscope.probes.coverage import ARCHITECTURES
from attnscope.probes.coverage.diffusion_models import diffusion_inputs
from attnscope.probes.heads import HeadSet

HEADS = [(0, 1), (1, 0)]


def readers(name, model):
    """Per layer: the linears reading its concatenated head outputs, and d_head."""
    if name == "bloom":
        return [[b.self_attention.dense] for b in model.transformer.h], model.config.hidden_size // model.config.n_head
    if name == "gpt_neo":
        d = model.config.hidden_size // model.config.num_heads
        return [[b.attn.attention.out_proj] for b in model.transformer.h], d
    return ([[b.attn.to_out[0]] + ([b.attn.to_add_out] if b.attn.to_add_out is not None else [])
             for b in model.transformer_blocks], model.config.attention_head_dim)


def zero_slice(head, d):
    def hook(module, args):
        x = args[0].clone()
        x[..., head * d:(head + 1) * d] = 0
        return (x,) + args[1:]
    return hook


@pytest.mark.parametrize("name", ["bloom", "gpt_neo", "sd3"])
def test_baked_mask_equals_hook_zeroing(name):
    model = ARCHITECTURES[name].builder()
    inputs = diffusion_inputs(name, model) if name == "sd3" else {"input_ids": torch.tensor([[3, 5, 7, 9, 11, 2]])}
    layers, d = readers(name, model)
    with torch.no_grad(), ExitStack() as stack:
        for layer, head in HEADS:
            for linear in layers[layer]:
                stack.enter_context(linear.register_forward_pre_hook(zero_slice(head, d)))
        expected = model(**inputs)[0]
    baked = copy.deepcopy(model)
    bake_mask(baked, HeadSet(HEADS))
    with torch.no_grad():
        got, clean = baked(**inputs)[0], model(**inputs)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (got - clean).abs().max() > 1e-4
