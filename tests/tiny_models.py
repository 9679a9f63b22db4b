"""Tiny random-init text models of each family, built from configs (no network)."""

import torch
import transformers


def tiny_text_model(family: str, attn: str = "sdpa") -> torch.nn.Module:
    """A tiny random-init model of the given family (seeded), in eval mode."""
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64)
    if family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                      bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel
    elif family == "llama":
        cfg, model = transformers.LlamaConfig(num_key_value_heads=2, **common), transformers.LlamaForCausalLM
    elif family == "qwen2":
        cfg, model = transformers.Qwen2Config(num_key_value_heads=1, **common), transformers.Qwen2ForCausalLM
    elif family == "mistral":
        cfg = transformers.MistralConfig(num_key_value_heads=2, sliding_window=5, **common)
        model = transformers.MistralForCausalLM
    elif family == "bert":
        cfg, model = transformers.BertConfig(**common), transformers.BertModel
    else:
        raise ValueError(family)
    cfg._attn_implementation = attn
    return model(cfg).eval()
