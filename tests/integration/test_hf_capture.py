"""HF text adapters on tiny random-init models: fidelity, statistics, selection, restoration, errors."""

import pytest
import torch
from tiny_models import tiny_text_model

import attnscope
from attnscope.probes import validate
from attnscope.probes.adapters import hf_route

FAMILIES = ["gpt2", "llama", "qwen2", "mistral", "bert"]


def _inputs(vocab=64, n=12):
    ids = torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_validate_passes_and_output_is_bit_identical(family, attn):
    model = tiny_text_model(family, attn)
    report = validate(model)
    assert report.ok, str(report)
    assert report.output_bit_identical
    assert report.attention_path == attn
    assert model.config._attn_implementation == attn


def _eager_patterns(model, inputs):
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(**inputs, output_attentions=True)
    finally:
        model.set_attn_implementation(before)
    return torch.stack(out.attentions)  # [layer, batch, head, query, key]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2", "bert"])
def test_streaming_stats_equal_stats_of_eager_patterns(family, attn):
    model = tiny_text_model(family, attn)
    inputs = _inputs()
    ref = _eager_patterns(model, inputs)
    trace = attnscope.capture(model, inputs, stats=("mass", "entropy", "topk"), mass_spans=[(0, 1), (3, 6)], topk=3,
                              budget_mb=1e-4)
    assert all(r.probs is None for r in trace.records.values())
    assert trace.provenance["cpu_statistics_kernel"] == "fused-c"  # CI builds the fused kernel: this tests it
    mass = torch.stack([ref[..., 0:1].sum(-1), ref[..., 3:6].sum(-1)], -1)
    logp = torch.log(ref.clamp_min(1e-30))
    entropy = -(ref * torch.where(ref > 0, logp, torch.zeros_like(logp))).sum(-1)
    torch.testing.assert_close(trace.stat("mass"), mass, atol=1e-5, rtol=0)
    torch.testing.assert_close(trace.stat("entropy"), entropy, atol=1e-5, rtol=0)
    torch.testing.assert_close(trace.stat("topk_weight"), ref.topk(3, -1).values, atol=1e-5, rtol=0)


def test_heads_and_rows_selection_equal_slices_of_full_patterns():
    model = tiny_text_model("llama")
    inputs = _inputs()
    full = attnscope.capture(model, inputs).stack()
    trace = attnscope.capture(model, inputs, heads="L0H1,L0H3,L1H*", rows="last:3")
    rec0, rec1 = trace[attnscope.Site("text", 0)], trace[attnscope.Site("text", 1)]
    assert rec0.heads() == [1, 3] and rec1.heads() == [0, 1, 2, 3] and rec0.rows() == [9, 10, 11]
    torch.testing.assert_close(rec0.probs, full[0][:, [1, 3]][:, :, 9:])
    torch.testing.assert_close(rec1.probs, full[1][:, :, 9:])


def test_sites_filter_and_context_manager_form():
    model = tiny_text_model("gpt2")
    inputs = _inputs()
    with attnscope.capture(model, sites=[attnscope.Site("text", 1)], stats=("entropy",)) as cap:
        model(**inputs)
    assert [str(s) for s in cap.trace.sites] == ["text.L1.self"]
    assert cap.trace[attnscope.Site("text", 1)].stats["entropy"].shape == (2, 4, 12)


def test_routing_restored_after_forward_raises():
    model = tiny_text_model("llama")
    with pytest.raises(attnscope.InputError, match="outside the vocabulary"):  # refused before the forward
        attnscope.capture(model, {"input_ids": torch.tensor([[1, 2, 999]])})

    def boom(*_):
        raise RuntimeError("boom")

    handle = model.model.layers[1].register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            attnscope.capture(model, {"input_ids": torch.tensor([[1, 2, 3]])})
    finally:
        handle.remove()
    assert model.config._attn_implementation == "sdpa"
    assert not hf_route._ACTIVE
    assert validate(model).ok


def test_forced_eager_is_recorded_and_restored():
    model = tiny_text_model("qwen2")
    trace = attnscope.capture(model, _inputs(), implementation="eager")
    assert trace.provenance["attention_path"].startswith("eager (forced")
    assert model.config._attn_implementation == "sdpa"


def test_decode_steps_are_recorded_per_call():
    model = tiny_text_model("llama")
    with attnscope.capture(model, stats=("topk",), topk=1) as cap:
        model.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    site = attnscope.Site("text", 0)
    assert cap.trace.steps(site) == [0, 1, 2]
    assert cap.trace.get(site, step=2).stats["topk_index"].shape == (1, 4, 1, 1)  # one query row per decode step


def test_input_longer_than_context_is_refused():
    model = tiny_text_model("gpt2")
    with pytest.raises(attnscope.InputTooLongError, match="<= 64 tokens"):
        attnscope.capture(model, torch.zeros(1, 65, dtype=torch.long))


def test_unsupported_model_raises_named_error():
    with pytest.raises(attnscope.UnsupportedModelError):
        attnscope.capture(torch.nn.Linear(2, 2), torch.zeros(1, 2))


def test_trace_from_capture_round_trips(tmp_path):
    trace = attnscope.capture(tiny_text_model("bert"), _inputs(), stats=("entropy",), patterns=True)
    loaded = attnscope.AttentionTrace.load(trace.save(tmp_path / "t.safetensors"))
    torch.testing.assert_close(loaded.stack(), trace.stack(), atol=0, rtol=0)
    assert loaded.provenance["attention_path"] == "sdpa"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_left_padding_matches_eager_including_fully_masked_rows(family):
    model = tiny_text_model(family)
    inputs = _inputs()
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["attention_mask"][1, :4] = 0  # left padding: the first query rows of item 1 see no key at all
    report = validate(model, inputs)
    assert report.ok, str(report)
    trace = attnscope.capture(model, inputs, stats=("entropy",))
    ref = _eager_patterns(model, inputs)
    logp = torch.log(ref.clamp_min(1e-30))
    torch.testing.assert_close(trace.stat("entropy"), -(ref * logp).sum(-1), atol=1e-5, rtol=0)
