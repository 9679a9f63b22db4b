"""Every term of a model's own attention is in the capture, or the capture refuses (issue: GPT-OSS sinks and T5
position bias were silently dropped). References are the models' own eager attention weights
(``output_attentions=True`` under ``attn_implementation="eager"``), which attnscope does not compute."""

import pytest
import torch
import transformers

import attnscope
from attnscope.errors import UnsupportedAttentionError
from attnscope.probes import validate
from attnscope.probes.adapters import hf_route
from attnscope.probes.site import Site
from attnscope.probes.statistics import statistics_from_probs


def tiny_gpt_oss():
    torch.manual_seed(0)
    cfg = transformers.GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2,
                                    num_experts_per_tok=1, max_position_embeddings=64, sliding_window=4,
                                    layer_types=["sliding_attention", "full_attention"])
    model = transformers.GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "sinks"):
                module.sinks.normal_(0.0, 2.0)  # init is zero-ish: make the sinks take visible mass
    return model


def tiny_t5():
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                                num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(cfg).eval()


def tiny_bart():
    torch.manual_seed(0)
    cfg = transformers.BartConfig(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=64)
    return transformers.BartForConditionalGeneration(cfg).eval()


def eager_weights(model, **inputs):
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model(**inputs, output_attentions=True)
    finally:
        model.set_attn_implementation(impl)


def test_gpt_oss_sinks_are_in_patterns_and_statistics():
    model = tiny_gpt_oss()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    ref = eager_weights(model, input_ids=ids).attentions
    trace = attnscope.capture(model, {"input_ids": ids})
    stats = attnscope.capture(model, {"input_ids": ids}, stats=("entropy", "mass", "topk"), topk=3,
                              mass_spans=[(0, 1), (2, 5)])
    for layer, expected in enumerate(ref):
        site = Site(tower="text", layer=layer, kind="self")
        got = trace.get(site).probs
        assert torch.allclose(got, expected, atol=1e-6)
        assert float(expected.sum(-1).min()) < 0.9  # the sinks took mass: a sink-free softmax would be off
        want = statistics_from_probs(expected.float(), ("entropy", "mass", "topk"), [(0, 1), (2, 5)], 3)
        rec = stats.get(site)
        assert torch.allclose(rec.stats["entropy"], want["entropy"], atol=1e-5)
        assert torch.allclose(rec.stats["mass"], want["mass"], atol=1e-6)
        assert torch.allclose(rec.stats["topk_weight"], want["topk_weight"], atol=1e-6)
    report = validate(model)
    assert report.ok and report.output_bit_identical, str(report)


def test_gpt_oss_edits_refuse_the_sinks_they_do_not_model():
    model = tiny_gpt_oss()
    module = hf_route.attention_modules(model)[0][1]
    ids = torch.randint(0, 64, (1, 6))
    before = model(ids).logits
    with pytest.raises(UnsupportedAttentionError, match="sinks"):
        with hf_route.edit_attention(model, {id(module): lambda *a, output, **k: output}):
            model(ids)
    assert torch.equal(model(ids).logits, before)
    assert model.config._attn_implementation == "eager" and not hf_route._ACTIVE


@pytest.mark.parametrize("build", [tiny_t5, tiny_bart], ids=["t5", "bart"])
def test_encoder_decoder_sites_towers_and_position_bias(build):
    model = build()
    ids = torch.randint(3, 64, (1, 9), generator=torch.Generator().manual_seed(2))
    adapter = attnscope.load(model)
    info = adapter.info()
    assert info.family == "encoder-decoder"
    assert {(t.name, t.n_layers, tuple(t.kinds)) for t in info.towers} == {
        ("encoder", 2, ("self",)), ("decoder", 2, ("cross", "self"))}
    trace = attnscope.capture(model, {"input_ids": ids})
    decoder_ids = adapter.prepare({"input_ids": ids}).kwargs["decoder_input_ids"]
    assert decoder_ids[0, 0] == model.config.decoder_start_token_id and torch.equal(decoder_ids[:, 1:], ids[:, :-1])
    ref = eager_weights(model, input_ids=ids, decoder_input_ids=decoder_ids)
    groups = {("encoder", "self"): ref.encoder_attentions, ("decoder", "self"): ref.decoder_attentions,
              ("decoder", "cross"): ref.cross_attentions}
    for (tower, kind), weights in groups.items():
        for layer, expected in enumerate(weights):
            got = trace.get(Site(tower=tower, layer=layer, kind=kind)).probs
            assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-6), (tower, kind, layer)
        assert trace.stack(tower, kind).shape[0] == len(weights)
    report = validate(model)
    assert report.ok and report.output_bit_identical, str(report)


def test_t5_position_bias_changes_the_pattern():
    """Without the relative position bias the rows differ a lot: the test above can fail."""
    model = tiny_t5()
    ids = torch.randint(3, 64, (1, 9))
    trace = attnscope.capture(model, {"input_ids": ids})
    attn = model.encoder.block[0].layer[0].SelfAttention
    with torch.no_grad():
        hidden = model.encoder.block[0].layer[0].layer_norm(model.shared(ids))
        q = attn.q(hidden).view(1, 9, 4, 8).transpose(1, 2)
        k = attn.k(hidden).view(1, 9, 4, 8).transpose(1, 2)
        no_bias = torch.softmax(q @ k.transpose(-1, -2), -1)  # T5 does not scale by 1/sqrt(d)
        with_bias = torch.softmax(q @ k.transpose(-1, -2) + attn.compute_bias(9, 9), -1)
    got = trace.get(Site(tower="encoder", layer=0, kind="self")).probs
    assert torch.allclose(got, with_bias, atol=1e-5)
    assert float((got - no_bias).abs().max()) > 0.05


def test_an_unknown_score_term_is_refused_not_dropped():
    """An attention function handed a tensor attnscope does not model (say an ALiBi bias) refuses to capture."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(cfg).eval()
    module = model.model.layers[0].self_attn
    q = k = v = torch.randn(1, 2, 5, 8)
    with attnscope.capture(model, stats=("entropy",)):
        with pytest.raises(UnsupportedAttentionError, match="alibi"):
            hf_route._attnscope_attention(module, q, k, v, None, scaling=0.3, alibi=torch.zeros(1, 2, 5, 5))
        hf_route._attnscope_attention(module, q, k, v, None, scaling=0.3, dropout=0.0)  # known terms pass
    assert not hf_route._ACTIVE and model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("build", [tiny_gpt_oss, tiny_t5], ids=["gpt-oss-sinks", "t5-position-bias"])
def test_nnsight_wrapped_models_keep_the_extra_terms(build):
    """The nnsight adapter reads q/k from the traced attention call: the sinks and the bias come along."""
    import nnsight

    model = build()
    report = validate(nnsight.NNsight(model))
    assert report.ok and report.probs_max_diff < 1e-5, str(report)
