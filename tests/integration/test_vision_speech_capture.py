"""Vision encoders (pixel_values) and Whisper (input_features): capture equals the models' own eager attention
weights, the patch grid and spans are recorded, validate passes with bit-identical outputs, and rollout runs
unchanged over a vision trace (vit-explain's use case)."""

import pytest
import torch
import transformers

import attnscope
from attnscope.circuits.attention_rollout import rollout
from attnscope.errors import InputError, UnsupportedModelError
from attnscope.probes import validate
from attnscope.probes.site import Site

VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
           patch_size=8)
# name -> (builder, tokens before the 4 x 4 patches)
VISION = {
    "vit": (lambda: transformers.ViTModel(transformers.ViTConfig(**VIT)), 1),
    "deit": (lambda: transformers.DeiTModel(transformers.DeiTConfig(**VIT)), 2),
    "dinov2": (lambda: transformers.Dinov2Model(transformers.Dinov2Config(**VIT)), 1),
    "dinov2-registers": (lambda: transformers.Dinov2WithRegistersModel(
        transformers.Dinov2WithRegistersConfig(num_register_tokens=4, **VIT)), 5),
    "clip-vision": (lambda: transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VIT)), 1),
    "siglip-vision": (lambda: transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VIT)), 0),
    "beit-relative-bias": (lambda: transformers.BeitModel(transformers.BeitConfig(use_relative_position_bias=True,
                                                                                  **VIT)), 1),
}


def _build(name):
    torch.manual_seed(0)
    model = VISION[name][0]().eval()
    with torch.no_grad():  # make position-bias tables visible (their init is zero)
        for pname, p in model.named_parameters():
            if "relative_position_bias_table" in pname:
                p.normal_(0.0, 2.0)
    return model


@pytest.mark.parametrize("name", sorted(VISION))
def test_vision_encoder_capture_equals_eager_weights(name):
    model = _build(name)
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    trace = attnscope.capture(model, pixels)
    n_prefix = VISION[name][1]
    assert trace.tokens.grid == (4, 4)
    assert trace.tokens.positions("image") == list(range(n_prefix, n_prefix + 16))
    assert trace.tokens.positions("special") == list(range(n_prefix))
    model.set_attn_implementation("eager")
    with torch.no_grad():
        expected = model(pixel_values=pixels, output_attentions=True).attentions
    model.set_attn_implementation("sdpa")
    assert [s for s in trace.sites] == [Site(tower="vision", layer=i, kind="self") for i in range(len(expected))]
    for layer, weights in enumerate(expected):
        assert torch.allclose(trace.get(Site(tower="vision", layer=layer, kind="self")).probs, weights, atol=1e-6)
    report = validate(model)
    assert report.ok and report.output_bit_identical, str(report)
    joint = rollout(trace)  # [layer, batch, query, key]; the default tower is the trace's only one
    assert joint.shape == (2, 2, 16 + n_prefix, 16 + n_prefix)
    assert torch.allclose(joint.sum(-1), torch.ones(2, 2, 16 + n_prefix), atol=1e-5)


def test_vision_encoder_refuses_text_and_flat_pixels():
    model = attnscope.load(_build("vit"))
    with pytest.raises(InputError, match="pixel_values"):
        attnscope.capture(model, "a photo of a cat")
    with pytest.raises(InputError, match="4-D"):
        attnscope.capture(model, torch.rand(3, 32, 32))


def test_whisper_encoder_decoder_capture_equals_eager_weights():
    torch.manual_seed(0)
    cfg = transformers.WhisperConfig(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16,
                                     max_target_positions=16, pad_token_id=1, bos_token_id=2, eos_token_id=3,
                                     decoder_start_token_id=2, suppress_tokens=[], begin_suppress_tokens=[])
    model = transformers.WhisperForConditionalGeneration(cfg).eval()
    features = torch.randn(1, 8, 32)
    decoder_ids = torch.tensor([[2, 7, 9, 11]])
    trace = attnscope.capture(model, {"input_features": features, "decoder_input_ids": decoder_ids})
    assert trace.tokens.positions("audio") == list(range(16))
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = model(input_features=features, decoder_input_ids=decoder_ids, output_attentions=True)
    model.set_attn_implementation("sdpa")
    groups = {("encoder", "self"): ref.encoder_attentions, ("decoder", "self"): ref.decoder_attentions,
              ("decoder", "cross"): ref.cross_attentions}
    for (tower, kind), weights in groups.items():
        assert trace.stack(tower, kind).shape[0] == len(weights) == 2
        for layer, expected in enumerate(weights):
            assert torch.allclose(trace.get(Site(tower=tower, layer=layer, kind=kind)).probs, expected, atol=1e-6)
    report = validate(model)
    assert report.ok and report.output_bit_identical and report.causal_leak == 0.0, str(report)


def test_an_unsupported_architecture_names_what_is_missing_and_how_to_register():
    torch.manual_seed(0)
    deberta_v1 = transformers.DebertaModel(transformers.DebertaConfig(  # BLOOM, GPT-Neo, DeBERTa-v2 are routed now
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)).eval()
    with pytest.raises(UnsupportedModelError) as err:
        attnscope.load(deberta_v1)
    message = str(err.value)
    assert "DisentangledSelfAttention" in message and "ALL_ATTENTION_FUNCTIONS" in message \
        and "register_adapter" in message


def test_wav2vec2_waveform_capture_equals_eager_weights():
    torch.manual_seed(0)
    cfg = transformers.Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 4),
                                      conv_kernel=(10, 8), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4,
                                      vocab_size=32)
    model = transformers.Wav2Vec2Model(cfg).eval()
    wave = torch.randn(1, 400)
    trace = attnscope.capture(model, wave)
    frames = int(model._get_feat_extract_output_lengths(torch.tensor(400)))
    assert trace.tokens.positions("audio") == list(range(frames))
    model.set_attn_implementation("eager")
    with torch.no_grad():
        expected = model(input_values=wave, output_attentions=True).attentions
    model.set_attn_implementation("sdpa")
    for layer, weights in enumerate(expected):
        got = trace.get(Site(tower="audio", layer=layer, kind="self")).probs
        assert got.shape[-1] == frames and torch.allclose(got, weights, atol=1e-6)
    report = validate(model)
    assert report.ok and report.output_bit_identical, str(report)


def test_clip_dual_encoder_captures_both_towers():
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                           image_size=32, patch_size=8), projection_dim=16)
    model = transformers.CLIPModel(cfg).eval()
    inputs = {"input_ids": torch.randint(3, 60, (2, 6)), "pixel_values": torch.rand(2, 3, 32, 32)}
    trace = attnscope.capture(model, inputs)
    assert trace.tokens.grid == (4, 4) and trace.towers() == ["text", "vision"]
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    model.set_attn_implementation("sdpa")
    for tower, weights in (("text", out.text_model_output.attentions), ("vision", out.vision_model_output.attentions)):
        for layer, expected in enumerate(weights):
            assert torch.allclose(trace.get(Site(tower=tower, layer=layer, kind="self")).probs, expected, atol=1e-6)
    assert validate(model).ok
    with pytest.raises(InputError, match="text and images together"):
        attnscope.capture(model, {"input_ids": inputs["input_ids"]})
