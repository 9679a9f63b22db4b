"""LLaVA-class VLM adapter on a tiny random-init LLaVA (CLIP vision tower + Llama text model with GQA)."""

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import attnscope
from attnscope.probes import validate
from attnscope.probes.adapters import hf_route
from attnscope.probes.adapters.hf_vlm import HFVisionLanguageAdapter, image_token_id, tiny_llava
from attnscope.probes.adapters.tl_bridge import tiny_word_tokenizer
from attnscope.probes.statistics import statistics_from_probs

N_IMAGE_TOKENS = 16  # (16 / 4) ** 2 patches, CLS dropped ("default" strategy)


@pytest.fixture(scope="module")
def llava():
    return tiny_llava()


def _impls(model):
    return model.config.text_config._attn_implementation, model.config.vision_config._attn_implementation


def test_adapter_is_found_and_describes_both_towers(llava):
    adapter = attnscope.load(llava)
    assert isinstance(adapter, HFVisionLanguageAdapter)
    info = adapter.info()
    assert [(t.name, t.n_layers, t.n_heads, t.n_kv_heads) for t in info.towers] == [("text", 2, 4, 2),
                                                                                    ("vision", 2, 4, 4)]
    assert attnscope.Site("vision", 0) in info.sites and attnscope.Site("vision", 1) in info.sites
    assert adapter.tokens_per_image() == N_IMAGE_TOKENS


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_validate_passes(llava, attn):
    llava.set_attn_implementation(attn)
    try:
        report = validate(llava)
        assert report.ok, str(report)
        assert report.output_bit_identical and report.attention_path == attn and report.n_sites == 4
        assert report.probs_max_diff < 1e-5
    finally:
        llava.set_attn_implementation("sdpa")
    assert _impls(llava) == ("sdpa", "sdpa")


def test_vision_sites_hold_patch_attention_and_text_sites_hold_sequence_attention(llava):
    adapter = HFVisionLanguageAdapter(llava)
    inputs = adapter.sample_inputs()
    trace = attnscope.capture(llava, inputs)
    n_text = inputs["input_ids"].shape[1]
    assert trace[attnscope.Site("vision", 1)].probs.shape == (2, 4, N_IMAGE_TOKENS + 1, N_IMAGE_TOKENS + 1)
    assert trace[attnscope.Site("text", 0)].probs.shape == (2, 4, n_text, n_text)
    assert trace.provenance["attention_path"] == "sdpa"


def test_image_spans_are_the_image_token_positions(llava):
    adapter = HFVisionLanguageAdapter(llava)
    prepared = adapter.prepare(adapter.sample_inputs())
    image_positions = (prepared.kwargs["input_ids"][0] == image_token_id(llava.config)).nonzero().flatten().tolist()
    assert prepared.tokens.positions("image") == image_positions == list(range(2, 2 + N_IMAGE_TOKENS))
    spans = [(s.modality, s.start, s.end) for s in prepared.tokens.spans]
    assert spans == [("text", 0, 2), ("image", 2, 18), ("text", 18, 22)]


def test_streaming_stats_equal_stats_of_reference_probabilities(llava):
    adapter = HFVisionLanguageAdapter(llava)
    inputs = adapter.sample_inputs()
    reference = adapter.reference_patterns(adapter.prepare(inputs))
    spans = [(0, 1), (2, 2 + N_IMAGE_TOKENS)]  # first token, the image
    trace = attnscope.capture(llava, inputs, stats=("mass", "entropy", "topk"), mass_spans=spans, topk=3,
                              budget_mb=1e-4)
    assert set(reference) == set(trace.sites)
    for site in trace.sites:
        rec = trace[site]
        assert rec.probs is None
        expected = statistics_from_probs(reference[site][0], ("mass", "entropy", "topk"), spans, 3)
        for name in ("mass", "entropy", "topk_weight"):
            torch.testing.assert_close(rec.stats[name], expected[name], atol=1e-5, rtol=0)


def test_routing_restored_after_forward_raises(llava):
    def boom(*_):
        raise RuntimeError("boom")

    handle = llava.model.language_model.layers[1].register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            attnscope.capture(llava, HFVisionLanguageAdapter(llava).sample_inputs())
    finally:
        handle.remove()
    assert _impls(llava) == ("sdpa", "sdpa")
    assert not hf_route._ACTIVE
    assert validate(llava).ok


def test_wrong_number_of_image_tokens_is_refused(llava):
    inputs = HFVisionLanguageAdapter(llava).sample_inputs()
    inputs["input_ids"] = inputs["input_ids"][:, :-1].clone()
    inputs["input_ids"][:, 2] = 5
    inputs["attention_mask"] = inputs["attention_mask"][:, :-1]
    with pytest.raises(attnscope.InputError, match="32 image tokens"):
        attnscope.capture(llava, inputs)


def _tiny_processor():
    tokenizer = tiny_word_tokenizer(63)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})  # id 63 = image_token_id
    image_processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 16},
                                                         crop_size={"height": 16, "width": 16})
    return transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=4,
                                       vision_feature_select_strategy="default", image_token="<image>",
                                       num_additional_image_tokens=1)


def test_text_and_image_through_the_processor_of_a_saved_model(llava, tmp_path):
    processor = _tiny_processor()
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == image_token_id(llava.config)
    llava.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = attnscope.load(str(tmp_path))
    assert isinstance(loaded, HFVisionLanguageAdapter)
    image = Image.fromarray((np.random.default_rng(0).random((20, 24, 3)) * 255).astype("uint8"))
    report = validate(loaded, ("w1 w2 <image> w3", image))
    assert report.ok, str(report)
    trace = attnscope.capture(loaded, ("w4 w5", image), stats=("entropy",))
    assert len(trace.tokens.positions("image")) == N_IMAGE_TOKENS  # image token prepended to text without one
    assert trace.tokens.strings[0][trace.tokens.positions("image")[0]] == "<image>"
