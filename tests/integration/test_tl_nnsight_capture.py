"""TransformerLens TransformerBridge and nnsight adapters on tiny random-init models, plus the torchvision guard.

Nothing here may run pip: the TransformerLens installer is replaced by attnscope's guard once the adapter is used
(tested below), and every test additionally fails if a subprocess is started at all.
"""

import subprocess
import tempfile
import sys
import types

import nnsight
import pytest
import torch
import transformers
from tiny_models import tiny_text_model

import attnscope
from attnscope.probes import validate
from attnscope.probes.adapters import hf_route, tl_guard
from attnscope.probes.adapters.nnsight_model import NNsightAdapter
from attnscope.probes.adapters.tl_bridge import TLBridgeAdapter, boot_bridge, tiny_word_tokenizer
from attnscope.probes.statistics import statistics_from_probs

IDS = {"bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 1}


@pytest.fixture(autouse=True)
def no_subprocesses(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a test started a subprocess: {args[:1]}")

    for name in ("Popen", "check_call", "run", "call", "check_output"):
        monkeypatch.setattr(subprocess, name, refuse)
    yield


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, **IDS)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _opt():
    torch.manual_seed(0)
    cfg = transformers.OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                 max_position_embeddings=64, word_embed_proj_dim=32, **IDS)
    return transformers.OPTForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def gpt2_bridge():
    return boot_bridge(_gpt2(), tiny_word_tokenizer(64))


@pytest.fixture(scope="module")
def opt_bridge():
    return boot_bridge(_opt(), tiny_word_tokenizer(64))


def _check_stats(adapter, inputs, model):
    reference = adapter.reference_patterns(adapter.prepare(inputs))
    spans = [(0, 1), (3, 6)]
    trace = attnscope.capture(model, inputs, stats=("mass", "entropy", "topk"), mass_spans=spans, topk=3,
                              budget_mb=1e-4)
    assert set(trace.sites) == set(reference)
    for site in trace.sites:
        expected = statistics_from_probs(reference[site][0], ("mass", "entropy", "topk"), spans, 3)
        for name in ("mass", "entropy", "topk_weight"):
            torch.testing.assert_close(trace[site].stats[name], expected[name], atol=1e-5, rtol=0)


# -- TransformerLens ---------------------------------------------------------------------------------------------------

def test_bridge_recomputes_attention_itself_whatever_the_hf_implementation(gpt2_bridge):
    loaded = attnscope.load(gpt2_bridge)
    assert isinstance(loaded, TLBridgeAdapter)
    assert gpt2_bridge.original_model.config._attn_implementation == "eager"  # boot_transformers forces eager
    for impl in ("eager", "sdpa"):
        gpt2_bridge.original_model.set_attn_implementation(impl)
        report = validate(loaded)
        assert report.ok and report.output_bit_identical, str(report)
        assert "recomputed" in report.attention_path and f"attn_implementation={impl} unused" in report.attention_path
    gpt2_bridge.original_model.set_attn_implementation("eager")
    assert validate(loaded, ["w1 w2 w3 w4", "w5 w6"]).ok  # text through the bridge's tokenizer, padded


def test_delegating_bridge_under_sdpa_routes_qk_and_stays_bit_identical(opt_bridge):
    hf = opt_bridge.original_model
    report = validate(opt_bridge)
    assert report.ok and report.attention_path == "eager (HF weights through hook_pattern)", str(report)
    hf.set_attn_implementation("sdpa")
    try:
        report = validate(opt_bridge)
        assert report.ok and report.output_bit_identical, str(report)
        assert "hook_pattern silent under sdpa" in report.attention_path
        trace = attnscope.capture(opt_bridge, TLBridgeAdapter(opt_bridge).sample_inputs(), implementation="eager")
        assert trace.provenance["attention_path"] == "eager (forced; model ran sdpa)"
        assert hf.config._attn_implementation == "sdpa"
    finally:
        hf.set_attn_implementation("eager")


def test_native_bridge_validates_against_a_plain_torch_recomputation():
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.model_bridge.sources import native  # noqa: F401  (adds boot_native)

    cfg = TransformerBridgeConfig(d_model=32, d_head=8, n_heads=4, n_layers=2, n_ctx=32, d_vocab=50, act_fn="gelu",
                                  seed=0)
    report = validate(TransformerBridge.boot_native(cfg))
    assert report.ok and "native" in report.attention_path, str(report)


def test_bridge_streaming_stats_equal_stats_of_the_hf_reference(gpt2_bridge):
    adapter = TLBridgeAdapter(gpt2_bridge)
    _check_stats(adapter, adapter.sample_inputs(), gpt2_bridge)


def _our_hooks(bridge):
    return [(name, len(hp.fwd_hooks), len(hp._forward_hooks)) for name, hp in bridge.hook_dict.items()
            if name.endswith("hook_pattern") and (hp.fwd_hooks or hp._forward_hooks)]


def test_bridge_hooks_removed_after_capture_and_after_a_forward_that_raises(gpt2_bridge):
    inputs = TLBridgeAdapter(gpt2_bridge).sample_inputs()
    attnscope.capture(gpt2_bridge, inputs)
    assert _our_hooks(gpt2_bridge) == []

    def boom(*_):
        raise RuntimeError("boom")

    handle = gpt2_bridge.blocks[1].mlp.register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            attnscope.capture(gpt2_bridge, inputs)
    finally:
        handle.remove()
    assert _our_hooks(gpt2_bridge) == []
    assert validate(gpt2_bridge).ok


# -- the torchvision guard ---------------------------------------------------------------------------------------------

def test_transformer_lens_torchvision_installer_raises_our_error_instead_of_running_pip(monkeypatch, gpt2_bridge):
    from transformer_lens.model_bridge.sources.transformers import helpers

    tl_guard.install()  # what booting gpt2_bridge did (another test may have removed it since)
    assert helpers._ensure_torchvision is tl_guard.refuse_torchvision_install
    monkeypatch.setitem(sys.modules, "torchvision", None)  # torchvision missing, whatever is installed

    def offline(*args, **kwargs):
        raise OSError("offline: no processor")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", offline)
    bridge = types.SimpleNamespace(processor=None)
    cfg = types.SimpleNamespace(is_multimodal=True)
    with pytest.raises(attnscope.UnsupportedModelError, match="pip install torchvision"):
        helpers.load_modality_processor(bridge, cfg, "some/multimodal-model", False, None)


def test_booting_a_multimodal_bridge_offline_raises_our_error_and_runs_no_pip(monkeypatch, tmp_path):
    """The real path: TransformerLens boots LLaVA, cannot load its processor, and reaches for its installer."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.model_bridge.sources import transformers as _tl_hf  # noqa: F401

    from attnscope.probes.adapters.hf_vlm import tiny_llava

    monkeypatch.setitem(sys.modules, "torchvision", None)
    model = tiny_llava()
    model.config.architectures = ["LlavaForConditionalGeneration"]
    tokenizer = tiny_word_tokenizer(64)
    tokenizer.save_pretrained(tmp_path / "tok")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    with tl_guard.guarded(), pytest.raises(attnscope.UnsupportedModelError, match="pip install torchvision"):
        TransformerBridge.boot_transformers(str(tmp_path / "no-such-model"), hf_model=model, tokenizer=tokenizer,
                                            device="cpu")


def test_the_guard_is_applied_when_the_adapter_is_first_used_and_is_removable(gpt2_bridge):
    from transformer_lens.model_bridge.sources.transformers import helpers

    was = tl_guard.is_installed()
    try:
        tl_guard.uninstall()  # as in a fresh process: importing attnscope applies nothing
        original = helpers._ensure_torchvision
        assert original is not tl_guard.refuse_torchvision_install and not tl_guard.is_installed()
        assert TLBridgeAdapter.matches(gpt2_bridge)  # the adapter's first use
        assert tl_guard.is_installed() and helpers._ensure_torchvision is tl_guard.refuse_torchvision_install
        tl_guard.uninstall()
        assert helpers._ensure_torchvision is original and not tl_guard.is_installed()
        assert not any(isinstance(f, tl_guard.PatchOnImport) for f in sys.meta_path)
        boot_bridge(_gpt2(), tiny_word_tokenizer(64))  # booting through attnscope applies it too
        assert tl_guard.is_installed() and helpers._ensure_torchvision is tl_guard.refuse_torchvision_install
    finally:
        (tl_guard.install if was else tl_guard.uninstall)()


def test_multimodal_bridges_are_refused_before_transformer_lens_boots():
    from attnscope.probes.adapters.hf_vlm import tiny_llava

    with pytest.raises(attnscope.UnsupportedModelError, match="multimodal"):
        boot_bridge(tiny_llava(), tiny_word_tokenizer(64))
    fake = types.SimpleNamespace(cfg=types.SimpleNamespace(is_multimodal=True, architecture="LlavaForConditional"))
    with pytest.raises(attnscope.UnsupportedModelError, match="multimodal"):
        TLBridgeAdapter(fake)


# -- nnsight -----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wrapped_llama():
    return nnsight.NNsight(tiny_text_model("llama"))


def test_nnsight_captures_inside_the_trace_under_sdpa_and_eager(wrapped_llama):
    loaded = attnscope.load(wrapped_llama)
    assert isinstance(loaded, NNsightAdapter)
    report = validate(loaded)
    assert report.ok and report.output_bit_identical, str(report)
    assert report.attention_path.startswith("nnsight in-trace: sdpa q/k from attention_interface inputs")
    loaded.reduce_in_trace = True
    report = validate(loaded)
    assert report.ok and "computed in the trace" in report.attention_path, str(report)
    loaded.reduce_in_trace = False
    trace = attnscope.capture(loaded, loaded.sample_inputs(), implementation="eager")
    assert trace.provenance["attention_path"] == "nnsight in-trace: eager weights from attn.output[1]"
    assert wrapped_llama._module.config._attn_implementation == "sdpa"


def test_nnsight_gpt2_and_eager_model_validate():
    model = tiny_text_model("gpt2", "eager")
    report = validate(nnsight.NNsight(model))
    assert report.ok and report.output_bit_identical and "eager weights" in report.attention_path, str(report)


def test_nnsight_streaming_stats_equal_stats_of_eager_reference(wrapped_llama):
    adapter = NNsightAdapter(wrapped_llama)
    _check_stats(adapter, adapter.sample_inputs(), wrapped_llama)


def test_nnsight_context_manager_form_records_through_the_fallback_once(wrapped_llama):
    with attnscope.capture(wrapped_llama, stats=("entropy",)) as cap:
        wrapped_llama._module(torch.tensor([[1, 2, 3, 4]]))
    assert [str(s) for s in cap.trace.sites] == ["text.L0.self", "text.L1.self"]
    assert all(cap.trace.steps(s) == [0] for s in cap.trace.sites)
    assert cap.trace.provenance["attention_path"].startswith("hf_route fallback")


def test_nnsight_restored_after_a_forward_that_raises(wrapped_llama):
    with pytest.raises(attnscope.InputError, match="outside the vocabulary"):  # refused before the forward
        attnscope.capture(wrapped_llama, {"input_ids": torch.tensor([[1, 2, 999]])})

    def boom(*_):
        raise RuntimeError("boom")

    handle = wrapped_llama._module.model.layers[1].register_forward_hook(boom)
    try:
        with pytest.raises(Exception, match="boom"):
            attnscope.capture(wrapped_llama, {"input_ids": torch.tensor([[1, 2, 3]])})
    finally:
        handle.remove()
    adapter = attnscope.load(wrapped_llama)
    assert wrapped_llama._module.config._attn_implementation == "sdpa"
    assert not hf_route._ACTIVE
    assert validate(adapter).ok


def test_bridge_refuses_attention_transformer_lens_would_compute_differently():
    """TransformerLens ignores GPT-2's ``scale_attn_weights=False``; its outputs would differ from the HF model's."""
    from attnscope.errors import UnsupportedModelError

    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=4,
                                  scale_attn_weights=False)
    with pytest.raises(UnsupportedModelError, match="scale_attn_weights=False"):
        boot_bridge(transformers.GPT2LMHeadModel(cfg).eval(), tiny_word_tokenizer(64))


def test_a_users_own_bridge_that_is_not_its_source_model_is_refused_at_load():
    """Booted by TransformerLens directly (not our boot_bridge): TL ignores scale_attn_weights=False, so its logits
    differ from the HF model's; attnscope.load checks the bridge against its source and refuses."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.model_bridge.sources import transformers as _tl_hf  # noqa: F401

    from attnscope.errors import UnsupportedModelError
    from attnscope.probes.adapters.tl_bridge import check_bridge_against_source

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=4,
                                  scale_attn_weights=False)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        hf.transformer.h[0].attn.c_attn.weight.mul_(20.0)  # peaked attention: the missing scale shows
    with tempfile.TemporaryDirectory() as folder:  # TransformerLens re-reads the tokenizer from its path
        tiny_word_tokenizer(64).save_pretrained(folder)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        bridge = TransformerBridge.boot_transformers(folder, hf_model=hf, tokenizer=tokenizer, device="cpu")
    with pytest.raises(UnsupportedModelError, match="scale_attn_weights"):
        attnscope.load(bridge)
    hf.config.scale_attn_weights = True  # now a config the bridge matches: the static rule passes
    assert check_bridge_against_source(bridge) < 1e-4
    hf.config.layer_norm_epsilon = 10.0  # the source changed after booting: the dynamic check sees the logits
    with pytest.raises(UnsupportedModelError, match="computes a different model"):
        check_bridge_against_source(bridge)


def test_a_faithful_bridge_passes_the_source_check(gpt2_bridge):
    from attnscope.probes.adapters.tl_bridge import check_bridge_against_source

    assert check_bridge_against_source(gpt2_bridge) < 1e-4
