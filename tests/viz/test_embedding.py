"""AttentionViz: collected queries and keys reproduce the captured attention pattern (softmax of q·k under the
model's mask), for GPT-2, Llama with GQA and RoPE, and the real MiniLM; the normalisation keeps every query's
softmax and equalises the mean norms; the embedding figure has both sets."""

import numpy as np
import pytest
import torch
from tiny_models import tiny_text_model

import attnscope
from attnscope.errors import InputError
from attnscope.probes.adapters.tl_bridge import tiny_word_tokenizer
from attnscope.viz import collect_queries_keys, joint_embedding, normalize_queries_keys, qk_embedding

TEXT = "w1 w5 w9 w2 w7 w7 w3 w11 w4"


def _check_reproduces_pattern(model, text, layer, head, causal):
    sample = collect_queries_keys(model, text, layer, head)
    logits = torch.tensor(sample.queries @ sample.keys.T, dtype=torch.float64)
    if causal:
        logits = logits.masked_fill(~torch.ones_like(logits, dtype=torch.bool).tril(), float("-inf"))
    probs = torch.softmax(logits, -1)
    captured = attnscope.capture(model, text).get(attnscope.Site("text", layer)).probs[0, head].double()
    torch.testing.assert_close(probs, captured, atol=2e-5, rtol=1e-4)
    return sample


@pytest.mark.parametrize("family,layer,head", [("gpt2", 1, 3), ("llama", 1, 3), ("llama", 0, 0)])
def test_queries_keys_reproduce_the_pattern_of_tiny_models(family, layer, head):
    model = attnscope.load(tiny_text_model(family), tokenizer=tiny_word_tokenizer(64))
    sample = _check_reproduces_pattern(model, TEXT, layer, head, causal=True)
    assert sample.queries.shape == sample.keys.shape == (len(sample.tokens), 8)


def test_queries_keys_reproduce_the_minilm_pattern_and_drop_padding(minilm):
    sample = _check_reproduces_pattern(minilm, "The cat sat on the mat.", 2, 7, causal=False)
    assert sample.tokens[0] == "[CLS]" and sample.tokens[-1] == "[SEP]"
    two = collect_queries_keys(minilm, ["A b.", "A much longer second sentence here."], 2, 7)
    assert "[PAD]" not in two.tokens and sorted(set(two.text_index.tolist())) == [0, 1]
    with pytest.raises(InputError):
        collect_queries_keys(minilm, "x", 6, 0)


def test_normalisation_keeps_softmax_and_equalises_norms():
    rng = np.random.default_rng(1)
    q, k = rng.normal(size=(7, 5)) * 4 + 1, rng.normal(size=(9, 5)) - 3
    qn, kn = normalize_queries_keys(q, k)
    before = torch.softmax(torch.tensor(q @ k.T), -1)
    after = torch.softmax(torch.tensor(qn @ kn.T), -1)
    torch.testing.assert_close(before, after)
    assert np.linalg.norm(qn, axis=1).mean() == pytest.approx(np.linalg.norm(kn, axis=1).mean())
    # keys were translated onto the query centroid before the (dot-product preserving) rescaling
    c = np.sqrt(np.linalg.norm(k - k.mean(0) + q.mean(0), axis=1).mean() / np.linalg.norm(q, axis=1).mean())
    np.testing.assert_allclose(qn.mean(0) / c, kn.mean(0) * c)


def test_embedding_figure_pca_and_umap_shapes():
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(20, 6)), rng.normal(size=(20, 6))
    qxy, kxy = joint_embedding(q, k, "pca")
    assert qxy.shape == kxy.shape == (20, 2)
    from attnscope.viz.embedding import QueryKeySample

    sample = QueryKeySample(q, k, [f"t{i % 3}" for i in range(20)], np.arange(20), np.zeros(20, int), 0, 0)
    fig = qk_embedding(sample, color="token")
    assert [t.name for t in fig.data] == ["queries", "keys"] and fig.data[1].marker.symbol == "x"
    with pytest.raises(InputError):
        joint_embedding(q, k, "tsne")
