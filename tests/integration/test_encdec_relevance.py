"""Chefer et al. encoder-decoder relevance against a transcription of the authors' code.

Reference: hila-chefer/Transformer-MM-Explainability, commit 58eaea85ac9c34aff052f368514b35d2e4c8dd3c,
``DETR/modules/ExplanationGenerator.py``: ``avg_heads`` (lines 19-24), ``apply_self_attention_rules`` (27-30),
``apply_mm_attention_rules`` (33-43), ``handle_residual`` (46-53), and ``Generator.handle_self_attention_image``
(110-118), ``handle_co_attn_self_query`` (120-129), ``handle_co_attn_query`` (131-140) as driven by
``generate_ours`` (142-192: R_i_i = I, R_q_q = I, R_q_i = 0; encoder blocks, then per decoder block its self
attention and its cross attention), with ``use_lrp=False`` (the method of the paper; the DETR notebook's call).
The transcription below changes only what ties it to DETR and float32: ``.cuda()`` is dropped, the maps come as
lists, and R_i_i, R_q_q, R_q_i start in the maps' dtype (float64 here; in float32, BART's tiny gradients make
``R - I`` cancel to zero rows, whose NaN zeroes every cross layer). The maps and gradients come from transformers'
own ``output_attentions=True`` under eager attention and ``torch.autograd.grad``, not from attnscope's capture.
"""

import numpy as np
import pytest
import torch

import attnscope
from attnscope.circuits.encoder_decoder_relevance import (METHOD, enc_dec_relevance,
                                                          enc_dec_relevance_table, propagate)
from attnscope.circuits.relevance_propagation import relevance
from attnscope.cli import main
from attnscope.probes.coverage.media_models import SPEECH
from attnscope.probes.coverage.text_models import ENCODER_DECODERS


# ---- transcription of the reference (see the module docstring for file and lines) -------------------------------
def avg_heads(cam, grad):
    cam = cam.reshape(-1, cam.shape[-2], cam.shape[-1])
    grad = grad.reshape(-1, grad.shape[-2], grad.shape[-1])
    cam = grad * cam
    cam = cam.clamp(min=0).mean(dim=0)
    return cam


def apply_self_attention_rules(R_ss, R_sq, cam_ss):
    R_sq_addition = torch.matmul(cam_ss, R_sq)
    R_ss_addition = torch.matmul(cam_ss, R_ss)
    return R_ss_addition, R_sq_addition


def apply_mm_attention_rules(R_ss, R_qq, cam_sq, apply_normalization=True, apply_self_in_rule_10=True):
    R_ss_normalized = R_ss
    R_qq_normalized = R_qq
    if apply_normalization:
        R_ss_normalized = handle_residual(R_ss)
        R_qq_normalized = handle_residual(R_qq)
    R_sq_addition = torch.matmul(R_ss_normalized.t(), torch.matmul(cam_sq, R_qq_normalized))
    if not apply_self_in_rule_10:
        R_sq_addition = cam_sq
    R_sq_addition[torch.isnan(R_sq_addition)] = 0
    return R_sq_addition


def handle_residual(orig_self_attention):
    self_attention = orig_self_attention.clone()
    diag_idx = range(self_attention.shape[-1])
    self_attention -= torch.eye(self_attention.shape[-1]).to(self_attention.device)
    assert self_attention[diag_idx, diag_idx].min() >= 0
    self_attention = self_attention / self_attention.sum(dim=-1, keepdim=True)
    self_attention += torch.eye(self_attention.shape[-1]).to(self_attention.device)
    return self_attention


def generate_ours(encoder, decoder, normalize_self_attention=True, apply_self_in_rule_10=True):
    """``encoder``: [(attn, grad)] per encoder layer; ``decoder``: [((attn, grad) self, (attn, grad) cross)]."""
    image_bboxes, queries_num = encoder[0][0].shape[-1], decoder[0][0][0].shape[-1]
    dtype = encoder[0][0].dtype  # the reference: float32 (torch's default)
    R_i_i = torch.eye(image_bboxes, image_bboxes, dtype=dtype)
    R_q_q = torch.eye(queries_num, queries_num, dtype=dtype)
    R_q_i = torch.zeros(queries_num, image_bboxes, dtype=dtype)
    for cam, grad in encoder:  # handle_self_attention_image
        cam = avg_heads(cam, grad)
        R_i_i += torch.matmul(cam, R_i_i)
    for (cam, grad), (cam_q_i, grad_q_i) in decoder:
        cam = avg_heads(cam, grad)  # handle_co_attn_self_query
        R_q_q_add, R_q_i_add = apply_self_attention_rules(R_q_q, R_q_i, cam)
        R_q_q += R_q_q_add
        R_q_i += R_q_i_add
        cam_q_i = avg_heads(cam_q_i, grad_q_i)  # handle_co_attn_query
        R_q_i += apply_mm_attention_rules(R_q_q, R_i_i, cam_q_i, apply_normalization=normalize_self_attention,
                                          apply_self_in_rule_10=apply_self_in_rule_10)
    return R_q_i, R_i_i, R_q_q
# ---- end of the transcription ---------------------------------------------------------------------------------------


def _recorded(model, kwargs, target):
    """Maps and gradients from transformers' own eager ``output_attentions`` and autograd, as float64."""
    model.set_attn_implementation("eager")
    try:
        out = model(**kwargs, output_attentions=True)
        maps = [*out.encoder_attentions, *out.decoder_attentions, *out.cross_attentions]
        grads = torch.autograd.grad(out.logits[0, -1, target], maps)
    finally:
        model.set_attn_implementation("sdpa")
    pairs = [(a[0].detach().double(), g[0].double()) for a, g in zip(maps, grads)]
    n_enc, n_dec = len(out.encoder_attentions), len(out.decoder_attentions)
    return pairs[:n_enc], list(zip(pairs[n_enc:n_enc + n_dec], pairs[n_enc + n_dec:]))


IDS = torch.tensor([[5, 9, 12, 33, 7, 40, 3]])


def _case(family):
    if family == "whisper":  # audio frames in, 4 decoder tokens
        model = SPEECH["whisper"]()
        return model, {k: v[:1] for k, v in attnscope.load(model).sample_inputs().items()}
    return ENCODER_DECODERS[family](), {"input_ids": IDS}


@pytest.mark.parametrize("family, position, zeroed", [
    ("t5", None, []), ("t5", 2, []), ("bart", None, []), ("bart", 2, []), ("whisper", None, []),
    ("whisper", 2, [0, 1]),  # the start token gets no positive self relevance: eq. 9 gives NaN, both layers add 0
])
def test_matches_the_reference_code(family, position, zeroed):
    model, inputs = _case(family)
    ours = enc_dec_relevance(model, inputs, position=position)
    kwargs = dict(attnscope.load(model).prepare(inputs).kwargs)
    end = kwargs["decoder_input_ids"].shape[1] if position is None else position + 1
    kwargs["decoder_input_ids"] = kwargs["decoder_input_ids"][:, :end]  # the output at `position` sees this prefix
    with torch.no_grad():
        logits = model(**kwargs).logits[0, -1]
    assert ours.target == int(logits.argmax()) and ours.position == end - 1
    r_qi, r_ii, r_qq = generate_ours(*_recorded(model, kwargs, ours.target))
    assert ours.zeroed_cross_layers == zeroed
    if zeroed:  # why: R_qq - I has a zero row (the start token's), in ours and in the reference's R_q_q
        assert float(ours.r_qq[0].sum()) == 1.0 == float(r_qq[0].sum()) and float(r_qi.abs().max()) == 0
    else:
        assert float(r_qi.abs().max()) > 0  # the cross rule really contributed
    assert r_qi.shape == (end, r_ii.shape[0])
    for got, want in ((ours.r_qs, r_qi), (ours.r_ss, r_ii), (ours.r_qq, r_qq)):  # BART's R_qs is ~1e-5: relative too
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-6, rtol=1e-6)
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-12, rtol=1e-6)
    assert model.config._attn_implementation == "sdpa"


def _one_head(a_bar):
    """A map and a gradient whose rule-5 head mean is ``a_bar`` (one head, gradient 1)."""
    return a_bar[None].clone(), torch.ones(1, *a_bar.shape, dtype=a_bar.dtype)


def test_identity_self_attention_leaves_the_cross_attention_alone():
    """Self-attention ``A_bar = c I`` everywhere: R_bar = 2 I, so R_qs = 4 (1 + c) C_0 + 4 C_1 (normalised) and
    (1 + c)^(2 + L_enc) (C_0 + C_1) without the eq. 8-9 normalisation."""
    c, n_enc, n_dec = 0.3, 5, 3
    gen = torch.Generator().manual_seed(0)
    cross = [torch.rand(n_dec, n_enc, generator=gen, dtype=torch.float64) for _ in range(2)]
    encoder = [c * torch.eye(n_enc, dtype=torch.float64)] * 3
    decoder = [(c * torch.eye(n_dec, dtype=torch.float64), cross[0]), (c * torch.eye(n_dec, dtype=torch.float64),
                                                                       cross[1])]
    r_qs, r_ss, r_qq, zeroed = propagate(encoder, decoder)
    torch.testing.assert_close(r_qs, 4 * (1 + c) * cross[0] + 4 * cross[1])
    torch.testing.assert_close(r_ss, (1 + c) ** 3 * torch.eye(n_enc, dtype=torch.float64))
    torch.testing.assert_close(r_qq, (1 + c) ** 2 * torch.eye(n_dec, dtype=torch.float64))
    assert zeroed == []
    r_qs, *_ = propagate(encoder, decoder, normalize=False)
    torch.testing.assert_close(r_qs, (1 + c) ** 5 * (cross[0] + cross[1]))
    ref = generate_ours([_one_head(a) for a in encoder], [(_one_head(s), _one_head(x)) for s, x in decoder])
    torch.testing.assert_close(ref[0], 4 * (1 + c) * cross[0] + 4 * cross[1])  # the reference agrees


def test_a_zero_relevance_row_zeroes_that_cross_layer_like_the_reference():
    """A decoder token with no self-attention relevance at layer 0: ``R_qq - I`` has a zero row, eq. 9 divides by 0,
    and the reference sets the NaN addition of that layer to 0; layer 1 adds normally."""
    gen = torch.Generator().manual_seed(1)
    encoder = [torch.rand(4, 4, generator=gen, dtype=torch.float64) for _ in range(2)]
    self0 = torch.rand(3, 3, generator=gen, dtype=torch.float64)
    self0[1] = 0
    decoder = [(self0, torch.rand(3, 4, generator=gen, dtype=torch.float64)),
               (torch.rand(3, 3, generator=gen, dtype=torch.float64), torch.rand(3, 4, generator=gen,
                                                                                 dtype=torch.float64))]
    r_qs, r_ss, r_qq, zeroed = propagate(encoder, decoder)
    ref = generate_ours([_one_head(a) for a in encoder], [(_one_head(s), _one_head(x)) for s, x in decoder])
    assert zeroed == [0] and not torch.isnan(r_qs).any() and float(r_qs.abs().max()) > 0
    for ours, theirs in zip((r_qs, r_ss, r_qq), ref):
        torch.testing.assert_close(ours, theirs)
    only_last, *_ = propagate(encoder, [(self0, torch.zeros(3, 4, dtype=torch.float64)), decoder[1]])
    torch.testing.assert_close(r_qs, only_last)  # layer 0's cross attention added nothing


@pytest.mark.parametrize("normalize, self_in_rule_10", [(True, True), (False, True), (True, False)])
def test_the_reference_ablation_flags(normalize, self_in_rule_10):
    """``normalize_self_attention`` and ``apply_self_in_rule_10`` of ``generate_ours`` on random maps."""
    gen = torch.Generator().manual_seed(2)
    rand = lambda *shape: torch.rand(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    encoder, decoder = [rand(5, 5) for _ in range(3)], [(rand(4, 4).tril(), rand(4, 5)) for _ in range(2)]
    ours = propagate(encoder, decoder, normalize, self_in_rule_10)
    ref = generate_ours([_one_head(a) for a in encoder], [(_one_head(s), _one_head(x)) for s, x in decoder],
                        normalize_self_attention=normalize, apply_self_in_rule_10=self_in_rule_10)
    for got, want in zip(ours[:3], ref):
        torch.testing.assert_close(got, want)
    assert ours[3] == []


def test_the_self_attention_relevance_refuses_an_encoder_decoder():
    with pytest.raises(attnscope.AnalysisError, match="enc_dec_relevance"):
        relevance(ENCODER_DECODERS["bart"](), {"input_ids": IDS})
    with pytest.raises(attnscope.AnalysisError, match="position out of range"):
        enc_dec_relevance(ENCODER_DECODERS["bart"](), {"input_ids": IDS}, position=7)


def test_attribute_command_uses_the_encoder_decoder_rule(tmp_path, capsys, minilm):
    """``attnscope attribute --method relevance`` on a saved T5 with a real tokenizer (MiniLM's WordPiece)."""
    import transformers

    minilm.tokenizer.save_pretrained(tmp_path / "tok")  # BERT's token_type_ids mean nothing to T5: leave them out
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok",
                                                           model_input_names=["input_ids", "attention_mask"])
    cfg = transformers.T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                decoder_start_token_id=0)
    torch.manual_seed(0)
    transformers.T5ForConditionalGeneration(cfg).eval().save_pretrained(tmp_path / "t5")
    tokenizer.save_pretrained(tmp_path / "t5")
    out = tmp_path / "rel.parquet"
    text = "Paris is in France."
    assert main(["attribute", "--model", str(tmp_path / "t5"), "--text", text, "--method", "relevance",
                 "--out", str(out)]) == 0
    assert "encoder-decoder rule" in capsys.readouterr().out
    table = attnscope.ResultTable.load(out)
    assert table.provenance["method"] == METHOD and table.provenance["position_of"] == "decoder"
    expected = enc_dec_relevance_table(attnscope.load(str(tmp_path / "t5")), [text])
    assert list(table.df["token"]) == ["[CLS]", "paris", "is", "in", "france", ".", "[SEP]"]
    np.testing.assert_allclose(table.df["value"].to_numpy(), expected.df["value"].to_numpy(), atol=1e-6)


def test_zeroed_layers_are_reported_in_the_table_and_the_summary(tmp_path):
    from attnscope.tasks.attribution_job import AttributionResult

    model, inputs = _case("whisper")
    table = enc_dec_relevance_table(model, inputs, position=2)
    assert table.provenance["zeroed_cross_layers"] == [0, 1] and (table.df["value"] == 0).all()
    assert list(table.df["token"])[:2] == ["frame 0", "frame 1"] and table.provenance["decoder_tokens"][0] == "2"
    text = AttributionResult("relevance", "whisper", table, tmp_path / "t.parquet").summary()
    assert "decoder position 2" in text and "decoder layers [0, 1] added no cross relevance" in text
