"""BLOOM (ALiBi), GPT-Neo (no scaling, local windows) and DeBERTa-v2 (disentangled c2p / p2c attention) compute
their attention scores inline; attnscope routes them through re-implemented forwards (``hf_inline``). Checked here
against references that never run attnscope code: the models' own eager ``output_attentions``, their untouched
outputs, and head edits written with plain forward hooks on the models' own output projections."""

import dataclasses

import pytest
import torch
import transformers

import attnscope
from attnscope.errors import UnsupportedModelError
from attnscope.probes.adapter import adapter_for
from attnscope.probes.adapters import inline_attention
from attnscope.probes.adapters.hf_route import edit_attention
from attnscope.probes.coverage.catalogue import ARCHITECTURES, perturbed, token_batch
from attnscope.probes.coverage.text_models import ENCODER, hf
from attnscope.probes.heads import HeadSet
from attnscope.probes.interventions import InterventionPlan, apply_plan

# DeBERTa-v2 with separate position projections and no log buckets (the coverage row has v3's shared keys)
SEPARATE = perturbed(hf("DebertaV2Config", "DebertaV2Model", **ENCODER, relative_attention=True,
                        pos_att_type=["c2p", "p2c"], max_relative_positions=6))
BUILDERS = {"bloom": ARCHITECTURES["bloom"].builder, "gpt_neo": ARCHITECTURES["gpt_neo"].builder,
            "deberta_v2": ARCHITECTURES["deberta_v2"].builder, "deberta_v2_separate": SEPARATE}
CLASSES = {"bloom": "transformers.models.bloom.modeling_bloom.BloomAttention",
           "gpt_neo": "transformers.models.gpt_neo.modeling_gpt_neo.GPTNeoSelfAttention",
           "deberta_v2": "transformers.models.deberta_v2.modeling_deberta_v2.DisentangledSelfAttention"}
CLASSES["deberta_v2_separate"] = CLASSES["deberta_v2"]
INPUTS = token_batch(0)  # 2 x 10 ids, the second row right-padded by 3


def _main(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


def _projection(model, name: str, layer: int) -> torch.nn.Module:
    """The model's own linear fed the concatenated head outputs of ``layer``."""
    if name == "bloom":
        return model.transformer.h[layer].self_attention.dense
    if name == "gpt_neo":
        return model.transformer.h[layer].attn.attention.out_proj
    return model.encoder.layer[layer].attention.output.dense


@pytest.fixture(params=list(BUILDERS))
def family(request):
    return request.param, BUILDERS[request.param]()


def test_patterns_equal_the_models_own_eager_attentions(family):
    name, model = family
    with torch.no_grad():
        own = model(**INPUTS, output_attentions=True).attentions
    trace = attnscope.capture(model, INPUTS)
    assert trace.provenance["family"] == "hf-inline"
    assert len(trace.sites) == len(own) == 2
    for site in trace.sites:
        got = trace[site].probs
        assert got.shape == own[site.layer].shape
        assert float((got - own[site.layer]).abs().max()) < 1e-5, site


def test_outputs_unchanged_and_forwards_restored_even_after_an_error(family):
    name, model = family
    with torch.no_grad():
        base = _main(model(**INPUTS))
    trace = attnscope.capture(model, INPUTS)
    # exact: the re-implemented kernels repeat the model's own ops in its order, so no tolerance is needed
    assert torch.equal(_main(trace.output), base)
    modules = [m for m in model.modules() if inline_attention.inline_spec(m) is not None]
    assert len(modules) == 2 and not any("forward" in vars(m) for m in modules)

    def broken(*args, **kwargs):
        raise RuntimeError("editor failed")
    with pytest.raises(RuntimeError, match="editor failed"):
        with edit_attention(model, {id(modules[0]): broken}), torch.no_grad():
            model(**INPUTS)
    assert not any("forward" in vars(m) for m in modules)
    with torch.no_grad():
        assert torch.equal(_main(model(**INPUTS)), base)


def test_zero_ablation_equals_a_plain_forward_hook(family):
    name, model = family
    layer, head = 1, 2
    with torch.no_grad():
        clean = _main(model(**INPUTS))
    with apply_plan(model, InterventionPlan(HeadSet([(layer, head)]), "zero")), torch.no_grad():
        got = _main(model(**INPUTS))
    projection = _projection(model, name, layer)
    d_head = projection.in_features // 4

    def zero_slice(module, args):
        x = args[0].clone()
        x[..., head * d_head:(head + 1) * d_head] = 0
        return (x,) + tuple(args[1:])
    handle = projection.register_forward_pre_hook(zero_slice)
    try:
        with torch.no_grad():
            want = _main(model(**INPUTS))
    finally:
        handle.remove()
    assert float((want - clean).abs().max()) > 1e-3  # the edit is visible
    assert torch.allclose(got, want, atol=1e-6, rtol=0)


def test_uniform_on_a_local_gpt_neo_layer_averages_the_window():
    model = BUILDERS["gpt_neo"]()
    attn = model.transformer.h[1].attn.attention  # layer 1 is local, window 4
    assert attn.attention_type == "local" and model.config.window_size == 4
    seen = {}
    handle = attn.register_forward_pre_hook(lambda module, args: seen.update(h=args[0]))
    with torch.no_grad():
        clean = model(**INPUTS).logits
    with apply_plan(model, InterventionPlan(HeadSet([(1, 1)]), "uniform")), torch.no_grad():
        got = model(**INPUTS).logits
    handle.remove()
    d_head, n = attn.head_dim, INPUTS["input_ids"].shape[1]
    value = attn.v_proj(seen["h"]).detach()[..., d_head:2 * d_head]  # head 1: [batch, seq, d]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    allowed = (j <= i) & (j > i - 4) & INPUTS["attention_mask"].bool()[:, None, :]  # [batch, query, key]
    average = (allowed.float() / allowed.float().sum(-1, keepdim=True)) @ value

    def put(module, args):
        x = args[0].clone()
        x[..., d_head:2 * d_head] = average
        return (x,)
    handle = attn.out_proj.register_forward_pre_hook(put)
    try:
        with torch.no_grad():
            want = model(**INPUTS).logits
    finally:
        handle.remove()
    assert float((want - clean).abs().max()) > 1e-3
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


def _altered(monkeypatch, name: str, change) -> None:
    """Register ``name``'s re-implementation with ``change(kwargs)`` applied to what it hands the routed function."""
    spec = inline_attention._SPECS[CLASSES[name]]

    def forward(module, attend, *args, **kwargs):
        return spec.forward(module, lambda *a, **k: attend(*a, **change(dict(k))), *args, **kwargs)
    monkeypatch.setitem(inline_attention._SPECS, CLASSES[name], dataclasses.replace(spec, forward=forward))


def _worst(model, own) -> float:
    trace = attnscope.capture(model, INPUTS)
    return max(float((trace[s].probs - own[s.layer]).abs().max()) for s in trace.sites)


@pytest.mark.parametrize("name", ["bloom", "deberta_v2", "deberta_v2_separate", "gpt_neo"])
def test_the_score_terms_are_in_the_capture(monkeypatch, name):
    """Without ALiBi / the disentangled terms / GPT-Neo's missing 1/sqrt(d), the capture would be wrong."""
    model = BUILDERS[name]()
    with torch.no_grad():
        own = model(**INPUTS, output_attentions=True).attentions
    assert _worst(model, own) < 1e-5
    if name == "bloom":
        _altered(monkeypatch, name, lambda k: {**k, "position_bias": torch.zeros_like(k["position_bias"])})
    elif name == "gpt_neo":
        d_head = model.config.hidden_size // model.config.num_heads
        _altered(monkeypatch, name, lambda k: {**k, "scaling": d_head ** -0.5})  # the usual scaling GPT-Neo lacks
    else:
        _altered(monkeypatch, name, lambda k: {key: v for key, v in k.items() if key != "position_bias"})
    assert _worst(model, own) > 1e-2


def test_gpt_neo_local_layers_keep_only_the_window():
    model = BUILDERS["gpt_neo"]()
    trace = attnscope.capture(model, INPUTS)
    glob, local = (trace[s].probs[0] for s in trace.sites)  # first row: no padding, 10 tokens, window 4
    old = torch.ones(10, 10, dtype=torch.bool).tril(-4)  # keys at least 4 positions back
    assert float(local[:, old].abs().max()) == 0.0
    assert float(glob[:, old].min()) > 0.0


def test_deberta_v1_and_other_inline_families_stay_refused():
    cfg = transformers.DebertaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, relative_attention=True, pos_att_type=["c2p", "p2c"])
    with pytest.raises(UnsupportedModelError, match="compute their scores inline"):
        adapter_for(transformers.DebertaModel(cfg).eval())


@pytest.mark.parametrize("name", ["bloom", "gpt_neo"])
def test_decoding_with_a_cache_is_captured_per_step(name):
    """ALiBi and the local window over a growing KV cache: generate is unchanged, and the last step's row equals
    the model's own eager weights for the full sequence."""
    model = BUILDERS[name]()
    ids = torch.tensor([[5, 6, 7, 8]])
    plain = model.generate(ids, max_new_tokens=4, do_sample=False)
    with attnscope.capture(model) as cap:
        generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, plain)
    with torch.no_grad():
        own = model(generated[:, :-1], output_attentions=True).attentions
    for site in cap.trace.sites:
        steps = cap.trace.steps(site)
        assert len(steps) == 4
        last = cap.trace.get(site, steps[-1]).probs[0, :, -1]
        assert float((last - own[site.layer][0, :, -1]).abs().max()) < 1e-5
