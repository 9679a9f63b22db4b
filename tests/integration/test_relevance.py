"""Chefer et al. relevance against a transcription built from HF's own output_attentions and autograd."""

import numpy as np
import pytest
import torch
from tiny_models import tiny_text_model

import attnscope
from attnscope.circuits.relevance_propagation import co_attention_update, normalize_residual, relevance


def _reference(model, inputs, position, target):
    """Independent path: eager output_attentions, torch.autograd.grad, numpy rules (5)-(7)."""
    model.set_attn_implementation("eager")
    try:
        out = model(**inputs, output_attentions=True)
        logits = out.logits[0, position] if out.logits.ndim == 3 else out.logits[0]
        attentions = out.attentions
        grads = torch.autograd.grad(logits[target], attentions)
    finally:
        model.set_attn_implementation("sdpa")
    n = attentions[0].shape[-1]
    r = np.eye(n)
    for a, g in zip(attentions, grads):
        a_bar = np.clip(g[0].detach().double().numpy() * a[0].detach().double().numpy(), 0, None).mean(0)
        r = r + a_bar @ r
    return r


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_causal_lm_relevance_matches_reference(family):
    model = tiny_text_model(family)
    inputs = {"input_ids": torch.tensor([[5, 9, 2, 33, 7, 1]])}
    result = relevance(model, inputs, target=11)
    ref = _reference(model, inputs, -1, 11)
    np.testing.assert_allclose(result.matrix.numpy(), ref, atol=1e-5)
    assert result.position == 5 and model.config._attn_implementation == "sdpa"
    assert np.allclose(np.triu(result.matrix.numpy(), 1), 0)  # causal: nothing relates to later tokens


def test_classifier_relevance_uses_cls_and_argmax():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, num_labels=3)
    model = transformers.BertForSequenceClassification(cfg).eval()
    inputs = {"input_ids": torch.tensor([[2, 8, 9, 10, 3]])}
    result = relevance(model, inputs)
    with torch.no_grad():
        predicted = int(model(**inputs).logits.argmax())
    assert result.target == predicted and result.position == 0
    np.testing.assert_allclose(result.matrix.numpy(), _reference(model, inputs, 0, predicted), atol=1e-5)


def test_relevance_table_and_minilm(minilm):
    table = attnscope.circuits.relevance_propagation.relevance_table(minilm, "The cat sat on the mat.")
    assert list(table.df["token"])[:2] == ["[CLS]", "the"] and (table.df["value"] >= 0).all()


def test_rules_8_to_10_by_hand():
    r_ss = torch.tensor([[1.0, 0.0], [1.0, 2.0]])
    bar = normalize_residual(r_ss)  # R - I = [[0, 0], [1, 1]] -> rows normalised [[0, 0], [.5, .5]] -> + I
    torch.testing.assert_close(bar, torch.tensor([[1.0, 0.0], [0.5, 1.5]]))
    a_bar = torch.tensor([[0.2, 0.8, 0.0], [0.0, 0.0, 1.0]])
    r_qq = torch.eye(3)
    new_sq, new_ss = co_attention_update(r_ss, r_qq, torch.zeros(2, 3), None, a_bar)
    torch.testing.assert_close(new_sq, bar.T @ a_bar)
    torch.testing.assert_close(new_ss, r_ss)


def test_batch_of_two_is_refused():
    model = tiny_text_model("gpt2")
    with pytest.raises(attnscope.AnalysisError, match="batch size 1"):
        relevance(model, {"input_ids": torch.zeros(2, 3, dtype=torch.long)})
