"""Per-tower head names (``encoder.L0H1``, ``vision.L1H0``, ``text.L0H0``, ``text.cross.L0H1``) on real tiny
models: the tower-qualified edit equals the same edit addressed globally and an independent reference (a forward
pre-hook zeroing / scaling that head's slice of the input of that tower's own output projection, named here per
family); unknown towers and layers are refused; plans keep the names through JSON; the CLI takes them. The vision
towers of LLaVA-class VLMs (LLaVA, Idefics3, Qwen2-VL: CLIP / SigLIP / packed attention) are edited too; their
layers come after the language model's in the global numbering."""

import json
from contextlib import contextmanager

import pandas as pd
import pytest
import torch
import transformers

from attnscope.cli import main
from attnscope.errors import HeadSpecError
from attnscope.probes.coverage.media_models import VLMS, vlm_inputs
from attnscope.probes.heads import HeadSet
from attnscope.probes.interventions import InterventionPlan, apply_plan
from attnscope.probes.tower_heads import editable_sites, resolve_heads, tower_names


def _t5():
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        decoder_start_token_id=0)).eval()


T5_INPUTS = {"input_ids": torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]]),
             "decoder_input_ids": torch.tensor([[0, 3, 4, 5], [0, 7, 8, 9]])}


def _vlm(name):
    torch.manual_seed(0)
    model = VLMS[name]().eval()
    for module in model.modules():  # Mllama gates cross-attention and global vision layers (tanh(gate), ~0 at init)
        for gate in ("cross_attn_attn_gate", "gate_attn"):
            if isinstance(getattr(module, gate, None), torch.nn.Parameter):
                getattr(module, gate).data.fill_(1.0)
    return model, vlm_inputs(name, model)


@contextmanager
def scaled_slice(projection: torch.nn.Module, head: int, d_head: int, factor: float):
    """The reference: scale head ``head``'s slice of ``projection``'s input."""
    def hook(module, args):
        x = args[0].clone()
        x[..., head * d_head:(head + 1) * d_head] *= factor
        return (x,) + tuple(args[1:])
    handle = projection.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _out(model, inputs, part=None):
    with torch.no_grad():
        out = model(**inputs) if part is None else part(model, inputs)
    if getattr(out, "last_hidden_state", None) is not None and part is not None:
        return out.last_hidden_state
    for name in ("logits", "logits_per_image"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    raise AssertionError(type(out))


def _mllama_vision(model, inputs):  # the vision tower alone: its output barely moves Mllama's random-init logits
    keys = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")
    return model.model.vision_model(**{k: inputs[k] for k in keys})


# (model, per-tower spec, global spec, reference projection, head, d_head[, the output compared])
CASES = {
    "t5-encoder": (_t5, "encoder.L1H2", "L1H2", lambda m: m.encoder.block[1].layer[0].SelfAttention.o, 2, 8),
    "t5-decoder": (_t5, "decoder.L0H1", "L2H1", lambda m: m.decoder.block[0].layer[0].SelfAttention.o, 1, 8),
    "clip-vision": ("clip", "vision.L1H0", "L3H0", lambda m: m.vision_model.encoder.layers[1].self_attn.out_proj,
                    0, 8),
    "clip-text": ("clip", "text.L0H3", "L0H3", lambda m: m.text_model.encoder.layers[0].self_attn.out_proj, 3, 8),
    "llava-text": ("llava", "text.L1H2", "L1H2", lambda m: m.model.language_model.layers[1].self_attn.o_proj, 2, 8),
    "llava-vision": ("llava", "vision.L1H1", "L3H1",
                     lambda m: m.model.vision_tower.encoder.layers[1].self_attn.out_proj, 1, 8),
    "idefics3-vision": ("idefics3", "vision.L0H2", "L2H2",
                        lambda m: m.model.vision_model.encoder.layers[0].self_attn.out_proj, 2, 8),
    "qwen2_vl-vision": ("qwen2_vl", "vision.L1H3", "L3H3", lambda m: m.model.visual.blocks[1].attn.proj, 3, 8),
    "mllama-text": ("mllama", "text.L0H0", "L3H0", lambda m: m.model.language_model.layers[0].self_attn.o_proj,
                    0, 8),
    "mllama-text-self-after-cross": ("mllama", "text.L1H3", "L4H3",
                                     lambda m: m.model.language_model.layers[2].self_attn.o_proj, 3, 8),
    "mllama-cross": ("mllama", "text.cross.L0H1", "L5H1",
                     lambda m: m.model.language_model.layers[1].cross_attn.o_proj, 1, 8),
    "mllama-vision": ("mllama", "vision.L2H2", "L2H2",
                      lambda m: m.model.vision_model.global_transformer.layers[0].self_attn.o_proj, 2, 8,
                      _mllama_vision),
}


def _build(source):
    return (source(), T5_INPUTS) if callable(source) else _vlm(source)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("mode,factor", [("zero", 0.0), ("rescale", 3.0)])
def test_tower_edit_equals_global_edit_and_a_hook_on_that_layer(case, mode, factor):
    source, spec, global_spec, projection_of, head, d_head, *part = CASES[case]
    model, inputs = _build(source)
    out = lambda: _out(model, inputs, *part)  # noqa: E731
    assert resolve_heads(spec, model) == HeadSet.parse(global_spec)
    assert tower_names(HeadSet.parse(global_spec), model) == spec
    clean = out()
    scale = factor if mode == "rescale" else None
    with apply_plan(model, InterventionPlan(HeadSet(), mode, scale=scale, tower_heads=spec)) as query:
        by_tower = out()
    assert query == HeadSet.parse(global_spec)
    with apply_plan(model, InterventionPlan(HeadSet.parse(global_spec), mode, scale=scale)):
        by_global = out()
    with scaled_slice(projection_of(model), head, d_head, factor):
        reference = out()
    assert (by_tower - clean).abs().max() > 1e-4  # the edit does something
    torch.testing.assert_close(by_tower, by_global, atol=0, rtol=0)
    torch.testing.assert_close(by_tower, reference, atol=2e-5, rtol=1e-4)


def test_mllama_layers_are_ordered_per_tower():
    model, _ = _vlm("mllama")
    assert [str(s) for s in editable_sites(model)] == [
        "vision.L0.self", "vision.L1.self", "vision.L2.self", "text.L0.self", "text.L1.self", "text.L0.cross"]
    spec = "vision.L0H1,text.L1H*,text.cross.L0H2"
    heads = resolve_heads(spec, model)
    assert str(heads) == "L0H1,L4H0,L4H1,L4H2,L4H3,L5H2"
    assert resolve_heads(tower_names(heads, model), model) == heads


@pytest.mark.parametrize("source,spec,message", [
    (_t5, "vision.L0H0", "no such editable tower"),
    (_t5, "encoder.L2H0", "layer out of range"),
    (_t5, "decoder.L0H4", "head out of range"),
    (_t5, "decoder.cross.L1H0", "cross-attention of 'decoder' is not editable"),
    ("llava", "vision.L2H0", "layer out of range"),
    ("llava", "audio.L0H0", "no such editable tower"),
    ("mllama", "text.cross.L1H0", "layer out of range"),
    (_t5, "encoder.L0X1", "malformed head spec"),
])
def test_unknown_towers_layers_and_heads_are_refused(source, spec, message):
    model, _ = _build(source)
    with pytest.raises(HeadSpecError, match=message) as err:
        resolve_heads(spec, model)
    assert err.value.expected and err.value.got and err.value.fix
    if "tower" in message or "layer" in message:
        assert "layers (global L" in str(err.value.expected)  # the towers and their layer counts, or the head limit
    with pytest.raises(HeadSpecError):
        with apply_plan(model, InterventionPlan(HeadSet(), "zero", tower_heads=spec)):
            pass


def test_plain_parser_refuses_tower_names_with_a_pointer():
    with pytest.raises(HeadSpecError, match="needs the model") as err:
        HeadSet.parse("vision.L0H1")
    assert "resolve_heads" in err.value.fix and "ablate" in err.value.fix
    assert HeadSet.check_spec("vision.L0H1,decoder.cross.L1H*") == "vision.L0H1,decoder.cross.L1H*"


def test_plan_json_keeps_tower_names_and_means_the_same_after_loading():
    model, inputs = _vlm("clip")
    plan = InterventionPlan(HeadSet(), "rescale", scale=0.5, tower_heads="vision.L1H0,text.L0H*")
    loaded = InterventionPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert loaded == plan and loaded.tower_heads == "vision.L1H0,text.L0H*"
    with apply_plan(model, plan) as q1:
        first = _out(model, inputs)
    with apply_plan(model, loaded) as q2:
        second = _out(model, inputs)
    assert q1 == q2 == HeadSet([(3, 0), (0, 0), (0, 1), (0, 2), (0, 3)])
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    old = InterventionPlan(HeadSet([(1, 0)]), "zero").to_dict()
    assert "tower_heads" not in old  # plans without tower names keep their JSON


def _bart():
    torch.manual_seed(0)
    return transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)).eval()


def test_cli_ablate_takes_tower_heads_on_a_saved_encoder_decoder(tmp_path, capsys):
    # BART: task evaluation feeds input_ids only, and BART makes its decoder ids from them (T5 does not)
    _bart().save_pretrained(tmp_path / "bart")
    common = ["ablate", "--model", str(tmp_path / "bart"), "--suite", "induction", "--suite-args",
              "vocab_size=64,seq_len=8", "--n", "4", "--metric", "loss"]
    assert main([*common, "--heads", "encoder.L0H1", "--out", str(tmp_path / "a.parquet")]) == 0
    text = capsys.readouterr().out
    assert "heads L0H1 (zero)" in text and "per tower: encoder.L0H1" in text
    assert "encoder: 2 layers (global L0-L1), decoder: 2 layers (global L2-L3)" in text
    df = pd.read_parquet(tmp_path / "a.parquet")
    assert set(df.tower_heads) == {"encoder.L0H1"} and set(df.heads) == {"L0H1"} and set(df.layer) == {-1}
    before, after = (float(df[df.setting == s].value.iloc[0]) for s in ("before", "after"))
    assert after != before  # the edit reached the model
    assert main([*common, "--heads", "L3H2", "--save-plan", str(tmp_path / "p.json")]) == 0  # global numbering
    assert "per tower: decoder.L1H2" in capsys.readouterr().out
    assert main([*common, "--heads", "decoder.L1H2", "--save-plan", str(tmp_path / "q.json")]) == 0
    assert "per tower: decoder.L1H2" in capsys.readouterr().out
    plan = json.loads((tmp_path / "q.json").read_text())
    assert plan["tower_heads"] == "decoder.L1H2" and plan["heads"] == "L3H2"
    assert "tower_heads" not in json.loads((tmp_path / "p.json").read_text())
    assert main([*common, "--heads", "decoder.L2H0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "layer out of range" in err[0]


def test_t5_saved_model_resolves_tower_heads(tmp_path):
    _t5().save_pretrained(tmp_path / "t5")
    model = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "t5")
    assert str(resolve_heads("encoder.L0H1,decoder.L1H*", model)) == "L0H1,L3H0,L3H1,L3H2,L3H3"


def test_denoiser_towers_resolve_to_the_same_edit_as_global_numbers():
    from attnscope.probes.coverage.diffusion_models import DIFFUSION, diffusion_inputs

    torch.manual_seed(0)
    unet = DIFFUSION["unet2d_condition"][1]().eval()
    inputs = diffusion_inputs("unet2d_condition", unet)
    sites = editable_sites(unet)
    spec = "unet.up.1.cross.L1H0"
    (layer, head), = resolve_heads(spec, unet)
    assert str(sites[layer]) == "unet.up.1.L1.cross" and tower_names(HeadSet([(layer, head)]), unet) == spec
    with torch.no_grad():
        clean = unet(**inputs).sample
        with apply_plan(unet, InterventionPlan(HeadSet(), "zero", tower_heads=spec)):
            by_tower = unet(**inputs).sample
        with apply_plan(unet, InterventionPlan(HeadSet([(layer, head)]), "zero")):
            by_global = unet(**inputs).sample
    assert (by_tower - clean).abs().max() > 1e-6
    torch.testing.assert_close(by_tower, by_global, atol=0, rtol=0)
