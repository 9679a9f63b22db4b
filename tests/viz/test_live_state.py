"""The live page's server side without a browser, on the real MiniLM and a tiny random-init Llama: captures and
their limits, views of a capture, the ablation's measured change (against what an ablation can and cannot reach,
and a numpy rollout), saving into the results folder, and the errors a person sees."""

import numpy as np
import pytest
import torch

from attnscope.dashboards import live_views as views
from attnscope.dashboards.files import ResultsRoot
from attnscope.dashboards.live_ablation import ablate, output_change, total_variation
from attnscope.dashboards.live_save import save_capture
from attnscope.dashboards.live_state import DENSE_LIMIT, LiveSession, parse_ids
from attnscope.errors import AttnscopeError, HeadSpecError, InputError

TEXT = "The cat sat on the mat because it was warm."


def _rollout_mean_readout(attn):
    """Abnar & Zuidema with numpy: A_hat = rownorm(mean_h A + I), J = A_hat_L ... A_hat_1, mean over rows."""
    joint = np.eye(attn.shape[-1])
    for layer in attn.astype(np.float64):
        a_hat = layer.mean(0) + np.eye(attn.shape[-1])
        joint = (a_hat / a_hat.sum(-1, keepdims=True)) @ joint
    return joint.mean(0)


def test_capture_keeps_tokens_patterns_and_queries_keys(cap, minilm):
    import attnscope

    assert cap.tokens[0] == "[CLS]" and cap.tokens[-1] == "[SEP]" and cap.n_tokens == 13
    assert (cap.n_layers, cap.n_heads, cap.causal) == (6, 12, False)
    np.testing.assert_allclose(cap.attn(), attnscope.capture(minilm, TEXT).stack()[:, 0].numpy(), atol=1e-6)
    assert sorted(cap.layers) == list(range(6))


def test_attribution_is_rollout_read_out_over_tokens(cap):
    values, title = views.attribution_values(cap)
    np.testing.assert_allclose(values, _rollout_mean_readout(cap.attn()), rtol=1e-5)
    assert "mean over tokens" in title


def test_views_of_a_capture_carry_its_key(cap):
    figures = [views.model_view_figure(cap, (2, 3)), views.head_view_figure(cap, 2, 3, "head", ("key", 0)),
               views.pattern_figure(cap, 2, 3, ("query", 4)), views.qk_figure(cap, 2, 3, ("key", 1)),
               views.attribution_figure(cap)]
    assert all(f.layout.meta == {"capture": cap.key} for f in figures)
    pattern = figures[2]
    assert "L2 H3" in pattern.layout.title.text and "query 4 'on'" in pattern.layout.title.text
    assert (pattern.layout.shapes[0].y0, pattern.layout.shapes[0].y1) == (3.5, 4.5)
    np.testing.assert_allclose(np.asarray(pattern.data[0].z), cap.attn()[2, 3], atol=1e-6)
    assert [t.name for t in figures[3].data] == ["queries", "keys", "selected"]


def test_ablation_reaches_only_later_layers(session, cap, minilm):
    result = ablate(minilm, cap, "L2H3", "zero")
    assert result.heads == "L2H3" and result.change.shape == (6, 12)
    assert not result.change[:3].any() and (result.change[3:] > 0).all()
    np.testing.assert_allclose(result.change, total_variation(cap.attn(), result.attn_after), rtol=1e-6)
    assert (result.token_change >= 0).all() and result.token_change.max() > 0
    assert "cosine to clean" in result.summary
    moved = views.pattern_change_figure(cap, result, 4, 2)  # a later head: its own difference
    np.testing.assert_allclose(moved.data[0].z, result.attn_after[4, 2] - cap.attn()[4, 2], atol=1e-7)
    layer, head = np.unravel_index(result.change.argmax(), result.change.shape)
    early = views.pattern_change_figure(cap, result, 1, 0)  # cannot change: the head that moved most instead
    assert f"L{layer} H{head}" in early.layout.title.text and "moved most" in early.layout.title.text
    uniform = ablate(minilm, cap, "L0H*", "uniform")
    assert uniform.heads == "L0H*" and (uniform.change[1:] > 0).all()


def test_ablation_errors_are_input_errors(cap, minilm):
    with pytest.raises(HeadSpecError):
        ablate(minilm, cap, "L9H0", "zero")
    with pytest.raises(HeadSpecError):
        ablate(minilm, cap, "head three", "zero")
    with pytest.raises(InputError, match="unknown ablation mode"):
        ablate(minilm, cap, "L1H1", "steer")


def _head_outputs(minilm, ids, layer, head):
    """Head ``head``'s output (the slice of the output projection's input) at every position, from a plain torch
    forward hook on BERT's ``attention.output.dense``: ``[seq, d_head]`` per call."""
    module = minilm.module
    d = module.config.hidden_size // module.config.num_attention_heads
    seen = []
    hook = module.encoder.layer[layer].attention.output.dense.register_forward_hook(
        lambda mod, args, out: seen.append(args[0][0, :, head * d:(head + 1) * d].double().clone()))
    try:
        with torch.no_grad():
            for row in ids:
                module(input_ids=torch.tensor([row]))
    finally:
        hook.remove()
    return seen


def _sentence_references(minilm):
    """What `attnscope ablate --model minilm --mode mean` averages over: the sentences suite (64 items) drawn with
    seed 0 + 1, tokenised with special tokens as the task metrics do."""
    from attnscope.datasets import sentences

    return [minilm.tokenizer(item.text)["input_ids"] for item in sentences(64, seed=1).items]


def test_mean_ablation_replaces_the_head_output_by_its_reference_mean(cap, minilm):
    from attnscope.dashboards.live_ablation import reference_set

    refs = _sentence_references(minilm)
    ids, what = reference_set(minilm, "minilm")
    assert ids == refs and "sentences" in what and "seed 1" in what
    mean = torch.cat(_head_outputs(minilm, refs, 2, 3)).mean(0)  # every token of every reference input
    module = minilm.module
    seen = []
    hook = module.encoder.layer[2].attention.output.dense.register_forward_hook(
        lambda mod, args, out: seen.append(args[0][0].double().clone()))
    try:
        result = ablate(minilm, cap, "L2H3", "mean")
    finally:
        hook.remove()
    ablated = seen[-1][:, 3 * 32:4 * 32]  # [seq, d_head] of L2H3 in the ablated run
    np.testing.assert_allclose(ablated.numpy(), mean[None].expand_as(ablated).numpy(), atol=2e-5)
    clean = _head_outputs(minilm, [minilm.tokenizer(TEXT)["input_ids"]], 2, 4)[0]
    np.testing.assert_allclose(seen[-1][:, 4 * 32:5 * 32].numpy(), clean.numpy(), atol=1e-5)  # other heads kept
    assert not result.change[:3].any() and (result.change[3:] > 0).all()  # layers up to L2 unchanged
    assert result.mode == "mean" and "sentences" in result.summary and result.reference == what


def test_resample_ablation_takes_the_head_output_of_another_reference_input(cap, minilm):
    refs = _sentence_references(minilm)
    outputs = _head_outputs(minilm, refs, 1, 5)
    seen = []
    hook = minilm.module.encoder.layer[1].attention.output.dense.register_forward_hook(
        lambda mod, args, out: seen.append(args[0][0, :, 5 * 32:6 * 32].double().clone()))
    try:
        result = ablate(minilm, cap, "L1H5", "resample")
    finally:
        hook.remove()
    n = cap.n_tokens
    matches = [j for j, out in enumerate(outputs) if len(refs[j]) >= n and
               np.allclose(seen[-1].numpy(), out[:n].numpy(), atol=1e-5)]
    assert len(matches) == 1  # exactly one reference input's head output, position by position
    assert not result.change[:2].any() and (result.change[2:] > 0).all()
    assert "resample over the reference" in result.summary


def test_total_variation_and_output_change_on_known_cases():
    a = np.array([[[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]]])
    b = np.array([[[[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]]]])
    assert total_variation(a, b).tolist() == [[0.25]]  # rows: 0.5 and 0.0

    class Out:
        def __init__(self, logits):
            self.logits = logits

    logits = torch.randn(1, 4, 10)
    values, name, _ = output_change(None, Out(logits), Out(logits.clone()))
    assert "KL" in name and np.allclose(values, 0.0, atol=1e-7)


def test_long_inputs_skip_the_dense_views():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    session = LiveSession(transformers.LlamaForCausalLM(cfg).eval(), "tiny")
    ids = " ".join(str(i % 64) for i in range(DENSE_LIMIT + 100))
    long = session.capture("tiny", ids, "ids")
    assert not long.dense and long.causal and long.n_tokens == DENSE_LIMIT + 100
    with pytest.raises(InputError, match="too long for the dense views"):
        long.attn()
    fig = views.long_figure(long, session.layer_inputs(long, 1), 2, "max", None)
    assert "L1 H2 · 612 tokens · max of 2×2 blocks → 306×306 cells" in fig.layout.title.text
    with pytest.raises(InputError, match="no tokenizer"):
        session.capture("tiny", "some words", "text")


def test_input_errors(session):
    assert parse_ids(" 1,2\n3 ").tolist() == [[1, 2, 3]]
    for bad in ("", "1 two 3", "-4"):
        with pytest.raises(InputError):
            parse_ids(bad)
    with pytest.raises(InputError, match="nothing to capture"):
        session.capture("minilm", "   ")
    with pytest.raises(InputError, match="model not offered"):
        session.capture("/etc", TEXT)
    with pytest.raises(AttnscopeError):
        session.capture("minilm", "99999999", "ids")  # outside the vocabulary
    with pytest.raises(InputError, match="not in memory"):
        session.get("c999")


def test_old_captures_are_dropped(minilm):
    from attnscope.dashboards.live_state import MAX_CAPTURES

    session = LiveSession(minilm, "minilm")
    keys = [session.capture("minilm", f"word {i}").key for i in range(MAX_CAPTURES + 2)]
    with pytest.raises(InputError):
        session.get(keys[0])
    assert session.get(keys[-1]).key == keys[-1]


def test_zoom_ranges_and_qk_focus():
    relayout = {"xaxis.range[0]": 99.5, "xaxis.range[1]": 199.5, "yaxis.range[0]": 499.5, "yaxis.range[1]": 299.5}
    assert views.zoom_ranges(relayout, 1000) == ((300, 500), (100, 200))
    assert views.zoom_ranges({"autosize": True}, 1000) is None
    assert views.qk_focus({"points": [{"curveNumber": 0, "pointNumber": 3}]}) == ("query", 3)
    assert views.qk_focus({"points": [{"curveNumber": 2, "pointNumber": 0}]}) is None


def test_save_writes_inside_the_results_folder(tmp_path, session, cap, minilm):
    import attnscope

    result = ablate(minilm, cap, "L1H0", "zero")
    paths = save_capture(minilm, cap, ResultsRoot(tmp_path), result)
    assert [p.split("_", 2)[-1].split(".")[-1] for p in paths] == ["safetensors", "parquet", "parquet"]
    assert all((tmp_path / p).resolve().is_relative_to(tmp_path.resolve()) for p in paths)
    trace = attnscope.AttentionTrace.load(tmp_path / paths[0])
    np.testing.assert_allclose(trace.stack()[:, 0].numpy(), cap.attn())
    table = attnscope.ResultTable.load(tmp_path / paths[2])
    assert table.provenance["ablated"] == "L1H0" and len(table.df) == 72
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]  # no temporary file left


def test_an_encoder_decoder_shows_its_encoder_and_ablates_it():
    """BART on the live page (token ids): the views hold the encoder's self-attention, equal to the model's own
    eager ``encoder_attentions``; zero-ablating encoder L0H1 leaves encoder layer 0 unchanged and moves layer 1."""
    import transformers

    from attnscope.dashboards.live_ablation import ablate

    torch.manual_seed(0)
    cfg = transformers.BartConfig(vocab_size=64, d_model=16, encoder_layers=2, decoder_layers=1,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                  decoder_ffn_dim=32, max_position_embeddings=64)
    model = transformers.BartForConditionalGeneration(cfg).eval()
    live = LiveSession(model, "tiny-bart")
    cap = live.capture("tiny-bart", "5 9 17 23 42 8", "ids")
    assert cap.tower == "encoder" and not cap.causal and (cap.n_layers, cap.n_heads) == (2, 2)
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        eager = model(input_ids=torch.tensor([[5, 9, 17, 23, 42, 8]]), output_attentions=True).encoder_attentions
    model.config._attn_implementation = "sdpa"
    np.testing.assert_allclose(cap.attn(), torch.stack(eager)[:, 0].numpy(), atol=1e-6)
    assert live.layer_inputs(cap, 1).queries.shape[:2] == (2, 6)
    result = ablate(live.model("tiny-bart"), cap, "L0H1", "zero")
    assert float(result.change[0].max()) == 0.0 and float(result.change[1].max()) > 0.0

    def zero_head_1(module, args):  # independent: head 1's slice of encoder L0's out_proj input set to 0
        x = args[0].clone()
        x[..., 8:16] = 0
        return (x,)
    model.config._attn_implementation = "eager"
    handle = model.model.encoder.layers[0].self_attn.out_proj.register_forward_pre_hook(zero_head_1)
    try:
        with torch.no_grad():
            hooked = model(input_ids=torch.tensor([[5, 9, 17, 23, 42, 8]]), output_attentions=True).encoder_attentions
    finally:
        handle.remove()
        model.config._attn_implementation = "sdpa"
    np.testing.assert_allclose(result.attn_after, torch.stack(hooked)[:, 0].numpy(), atol=1e-6)
