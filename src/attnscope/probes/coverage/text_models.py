"""Tiny random-init text models of the coverage matrix: decoders, encoders and encoder-decoders.

Every builder returns a seeded, random-init model in eval mode with 2 layers (per stack), 4 heads and width 32
(where the family allows), so it builds in well under a second and weighs a few hundred kilobytes. Constructor
arguments are those of the installed transformers (5.x configs are dataclasses; unknown names raise).
"""

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

VOCAB = 64
# the Llama-class core most decoder configs accept (GQA: 4 query heads over 2 KV heads)
DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
ENCODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=64, pad_token_id=0)
SEQ2SEQ = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
               pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)


def hf(config: str, model: str, **kwargs: Any) -> Callable[[], nn.Module]:
    """A builder of ``transformers.<model>(transformers.<config>(**kwargs))``, seeded, in eval mode."""
    def build() -> nn.Module:
        import transformers

        cfg = getattr(transformers, config)(**kwargs)
        torch.manual_seed(0)
        return getattr(transformers, model)(cfg).eval()
    build.__qualname__ = f"hf({model})"
    return build


def _decoder(prefix: str, **overrides: Any) -> Callable[[], nn.Module]:
    return hf(f"{prefix}Config", f"{prefix}ForCausalLM", **{**DECODER, **overrides})


MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
TEXT_DECODERS: dict[str, Callable[[], nn.Module]] = {
    "gpt2": hf("GPT2Config", "GPT2LMHeadModel", vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
               bos_token_id=1, eos_token_id=2),
    "gpt_neo": hf("GPTNeoConfig", "GPTNeoForCausalLM", vocab_size=VOCAB, max_position_embeddings=64, hidden_size=32,
                  num_layers=2, num_heads=4, intermediate_size=64, attention_types=[[["global", "local"], 1]],
                  window_size=4, bos_token_id=1, eos_token_id=2),
    "gpt_neox": hf("GPTNeoXConfig", "GPTNeoXForCausalLM", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                   num_attention_heads=4, intermediate_size=64, max_position_embeddings=64, bos_token_id=1,
                   eos_token_id=2),
    "gptj": hf("GPTJConfig", "GPTJForCausalLM", vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
               rotary_dim=4, n_inner=64, bos_token_id=1, eos_token_id=2),
    "codegen": hf("CodeGenConfig", "CodeGenForCausalLM", vocab_size=VOCAB, n_positions=64, n_ctx=64, n_embd=32,
                  n_layer=2, n_head=4, rotary_dim=4, n_inner=64, bos_token_id=1, eos_token_id=2),
    "opt": hf("OPTConfig", "OPTForCausalLM", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
              max_position_embeddings=64, num_attention_heads=4, word_embed_proj_dim=32, pad_token_id=0,
              bos_token_id=1, eos_token_id=2),
    "bloom": hf("BloomConfig", "BloomForCausalLM", vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4),
    "falcon": hf("FalconConfig", "FalconForCausalLM", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                 num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True, max_position_embeddings=64,
                 bos_token_id=1, eos_token_id=2),
    "biogpt": hf("BioGptConfig", "BioGptForCausalLM", **{**ENCODER, "bos_token_id": 1, "eos_token_id": 2}),
    "llama": _decoder("Llama"),
    "mistral": _decoder("Mistral", sliding_window=5),
    "mixtral": _decoder("Mixtral", num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    "qwen2": _decoder("Qwen2", num_key_value_heads=1),
    "qwen2_moe": _decoder("Qwen2Moe", shared_expert_intermediate_size=32, **MOE),
    "qwen3": _decoder("Qwen3", head_dim=8),
    "qwen3_moe": _decoder("Qwen3Moe", head_dim=8, **MOE),
    "gemma": _decoder("Gemma", head_dim=8),
    "gemma2": _decoder("Gemma2", head_dim=8, sliding_window=4, attn_logit_softcapping=5.0,
                       final_logit_softcapping=30.0, query_pre_attn_scalar=8),
    "gemma3_text": hf("Gemma3TextConfig", "Gemma3ForCausalLM", **DECODER, head_dim=8, sliding_window=4,
                      query_pre_attn_scalar=8, layer_types=["sliding_attention", "full_attention"]),
    "phi": _decoder("Phi", num_key_value_heads=4),
    "phi3": _decoder("Phi3"),
    "starcoder2": _decoder("Starcoder2", sliding_window=5),
    "olmo": _decoder("Olmo"),
    "olmo2": _decoder("Olmo2"),
    "cohere": _decoder("Cohere"),
    "stablelm": _decoder("StableLm"),
    "granite": _decoder("Granite", attention_multiplier=0.3, embedding_multiplier=2.0, residual_multiplier=0.5,
                        logits_scaling=2.0),
    "granitemoe": hf("GraniteMoeConfig", "GraniteMoeForCausalLM", **DECODER, num_local_experts=4,
                     num_experts_per_tok=2, attention_multiplier=0.3),
    "deepseek_v3": _decoder("DeepseekV3", num_key_value_heads=4, moe_intermediate_size=32, n_shared_experts=1,
                            n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, kv_lora_rank=16,
                            q_lora_rank=16, qk_rope_head_dim=4, v_head_dim=8, qk_nope_head_dim=8,
                            first_k_dense_replace=1, rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
    "gpt_oss": hf("GptOssConfig", "GptOssForCausalLM", **{**DECODER, "intermediate_size": 32}, head_dim=8,
                  num_local_experts=2, num_experts_per_tok=1, sliding_window=4,
                  layer_types=["sliding_attention", "full_attention"]),
    "smollm3": _decoder("SmolLM3", no_rope_layers=[1, 0]),
    "ministral": _decoder("Ministral", head_dim=8, sliding_window=4,
                          layer_types=["sliding_attention", "full_attention"]),
    "exaone4": _decoder("Exaone4", sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
    "helium": _decoder("Helium", head_dim=8),
    "glm": _decoder("Glm", head_dim=8),
    "nemotron": _decoder("Nemotron", head_dim=8),
    "persimmon": _decoder("Persimmon", num_key_value_heads=4),
}

TEXT_ENCODERS: dict[str, Callable[[], nn.Module]] = {
    "bert": hf("BertConfig", "BertModel", **ENCODER),
    "roberta": hf("RobertaConfig", "RobertaModel", **{**ENCODER, "pad_token_id": 1, "max_position_embeddings": 80}),
    "xlm_roberta": hf("XLMRobertaConfig", "XLMRobertaModel",
                      **{**ENCODER, "pad_token_id": 1, "max_position_embeddings": 80}),
    "camembert": hf("CamembertConfig", "CamembertModel",
                    **{**ENCODER, "pad_token_id": 1, "max_position_embeddings": 80}),
    "electra": hf("ElectraConfig", "ElectraModel", **ENCODER, embedding_size=32),
    "albert": hf("AlbertConfig", "AlbertModel", **ENCODER, embedding_size=16),
    "distilbert": hf("DistilBertConfig", "DistilBertModel", vocab_size=VOCAB, dim=32, hidden_dim=64, n_layers=2,
                     n_heads=4, max_position_embeddings=64, pad_token_id=0),
    "modernbert": hf("ModernBertConfig", "ModernBertModel", **ENCODER, global_attn_every_n_layers=2,
                     local_attention=4, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2),
    # DeBERTa-v3's attention: relative c2p and p2c terms over log buckets, shared keys (the defaults turn them off)
    "deberta_v2": hf("DebertaV2Config", "DebertaV2Model", **ENCODER, relative_attention=True,
                     pos_att_type=["p2c", "c2p"], position_buckets=8, max_relative_positions=16, share_att_key=True,
                     norm_rel_ebd="layer_norm"),
    "mobilebert": hf("MobileBertConfig", "MobileBertModel", **ENCODER, embedding_size=16, intra_bottleneck_size=32,
                     true_hidden_size=32, num_feedforward_networks=1),
    "clip_text": hf("CLIPTextConfig", "CLIPTextModel", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                    num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, pad_token_id=1,
                    bos_token_id=0, eos_token_id=2),
}

ENCODER_DECODERS: dict[str, Callable[[], nn.Module]] = {
    "t5": hf("T5Config", "T5ForConditionalGeneration", vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
             num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0),
    "mt5": hf("MT5Config", "MT5ForConditionalGeneration", vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64,
              num_layers=2, num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8,
              decoder_start_token_id=0),
    "bart": hf("BartConfig", "BartForConditionalGeneration", **SEQ2SEQ),
    "mbart": hf("MBartConfig", "MBartForConditionalGeneration", **SEQ2SEQ),
    "pegasus": hf("PegasusConfig", "PegasusForConditionalGeneration", **SEQ2SEQ),
    "marian": hf("MarianConfig", "MarianMTModel", **SEQ2SEQ),
    "m2m_100": hf("M2M100Config", "M2M100ForConditionalGeneration", **SEQ2SEQ),
}
