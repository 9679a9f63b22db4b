"""Head interventions on families whose output projection attnscope does not know (GPT-NeoX, GPT-J, OPT, Falcon,
Phi-3 with fused qkv, DeepSeek-V3 MLA, DistilBERT, ModernBERT, CLIP text, T5, Whisper): the edit runs inside the
routed attention function; the independent reference is a forward pre-hook on the family's own output projection,
named per family here, scaling that head's input slice."""

import pytest
import torch
import transformers

import attnscope
from attnscope.probes.head_slices import output_projections
from attnscope.probes.heads import HeadSet
from attnscope.probes.interventions import InterventionPlan, apply_plan

FAMILIES = {  # name -> (builder, output projection attribute of the attention module)
    "gpt_neox": (lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)), "dense"),
    "gptj": (lambda: transformers.GPTJForCausalLM(transformers.GPTJConfig(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4)), "out_proj"),
    "opt": (lambda: transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
        word_embed_proj_dim=32)), "out_proj"),
    "falcon": (lambda: transformers.FalconForCausalLM(transformers.FalconConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)), "dense"),
    "phi3": (lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, pad_token_id=0)), "o_proj"),
    "deepseek_v3": (lambda: transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=64, moe_intermediate_size=16, n_routed_experts=2, num_experts_per_tok=1,
        n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=4,
        qk_nope_head_dim=4, v_head_dim=6, n_group=1, topk_group=1)), "o_proj"),
    "distilbert": (lambda: transformers.DistilBertModel(transformers.DistilBertConfig(
        vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=64)), "out_lin"),
    "modernbert": (lambda: transformers.ModernBertModel(transformers.ModernBertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        pad_token_id=0)), "Wo"),
    "clip_text": (lambda: transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)),
        "out_proj"),
    "t5": (lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        decoder_start_token_id=0)), "o"),
}


def _output(model, kwargs):
    with torch.no_grad():
        out = model(**kwargs)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize("mode,factor", [("zero", 0.0), ("rescale", 3.0)])
def test_routed_head_edit_equals_a_hook_on_the_familys_projection(name, mode, factor):
    torch.manual_seed(0)
    build, attr = FAMILIES[name]
    model = build().eval()
    projections = output_projections(model)
    assert all(p.family == "routed" and p.module is None for p in projections)
    kwargs = attnscope.load(model).prepare(torch.randint(3, 64, (2, 9))).kwargs
    layer, head = len(projections) - 1, 1
    proj = projections[layer]
    plan = InterventionPlan(HeadSet([(layer, head)]), mode, scale=factor if mode == "rescale" else None)
    clean = _output(model, kwargs)
    with apply_plan(model, plan):
        ours = _output(model, kwargs)

    def hook(module, args):
        x = args[0].clone()
        x[..., head * proj.d_head:(head + 1) * proj.d_head] *= factor
        return (x,) + tuple(args[1:])

    handle = getattr(proj.attention, attr).register_forward_pre_hook(hook)
    try:
        reference = _output(model, kwargs)
    finally:
        handle.remove()
    assert float((ours - clean).abs().max()) > 1e-5
    assert torch.allclose(ours, reference, atol=1e-5), float((ours - reference).abs().max())
    assert torch.equal(_output(model, kwargs), clean)  # nothing stays installed


def test_encoder_decoder_layers_are_the_encoders_then_the_decoders_self_attention():
    model = FAMILIES["t5"][0]().eval()
    names = [p.name for p in output_projections(model)]
    assert names == ["encoder.block.0.layer.0.SelfAttention", "encoder.block.1.layer.0.SelfAttention",
                     "decoder.block.0.layer.0.SelfAttention", "decoder.block.1.layer.0.SelfAttention"]
