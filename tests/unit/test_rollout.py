"""Attention rollout against a plain-numpy transcription of Abnar & Zuidema (2020), its options, and the
attribution table."""

import numpy as np
import pytest
import torch
from jaxtyping import Float
from torch import Tensor

from attnscope.circuits.token_attribution import attribution_table
from attnscope.circuits.attention_rollout import rollout
from attnscope.errors import AnalysisError
from attnscope.probes.site import Site
from attnscope.probes.tokens import TokenInfo
from attnscope.probes.trace import AttentionTrace, SiteRecord


def softmax_attention(*shape, temp=1.0, seed=0, causal=False):
    """Random probabilities of the given shape (last two dims query, key)."""
    logits = np.random.default_rng(seed).standard_normal(shape) * temp
    if causal:
        logits = np.where(np.tril(np.ones(shape[-2:], bool)), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def reference_rollout(attn, fusion="mean", residual=0.5, discard=0.0, start=0, exclude=(), renorm=True):
    """Independent transcription of the definition, for one item: attn [layer, head, n, n] -> [layer, n, n]."""
    n_layers, _, n, _ = attn.shape
    out = []
    joint = None
    for layer in range(n_layers):
        w = {"mean": attn[layer].mean(0), "max": attn[layer].max(0), "min": attn[layer].min(0)}[fusion].copy()
        for t in exclude:
            w[:, t] = 0.0
        if exclude and renorm:
            for i in range(n):
                s = w[i].sum()
                w[i] = w[i] / s if s > 0 else 0.0
        if discard > 0:
            pairs = sorted((w[i, j], i * n + j) for i in range(n) for j in range(n) if i != j)
            for _, flat in pairs[:int(discard * n * (n - 1))]:
                w[flat // n, flat % n] = 0.0
        aug = residual * np.eye(n) + (1 - residual) * w
        aug = aug / aug.sum(-1, keepdims=True)
        if layer < start:
            out.append(np.eye(n))
            continue
        joint = aug if joint is None else aug @ joint
        out.append(joint)
    return np.stack(out)


def test_default_matches_reference_and_paper_form():
    attn = softmax_attention(4, 3, 6, 6, seed=1)
    got = rollout(torch.tensor(attn))
    assert isinstance(got, Float[Tensor, "layer query key"]) and got.shape == (4, 6, 6)
    np.testing.assert_allclose(got.numpy(), reference_rollout(attn), atol=1e-12)
    paper = None  # the reference code: aug = A + I; aug /= aug.sum(-1); joint = aug_l @ joint
    for layer in range(4):
        aug = attn[layer].mean(0) + np.eye(6)
        aug /= aug.sum(-1, keepdims=True)
        paper = aug if paper is None else aug @ paper
    np.testing.assert_allclose(got[-1].numpy(), paper, atol=1e-12)
    np.testing.assert_allclose(got.sum(-1).numpy(), 1.0, atol=1e-12)


@pytest.mark.parametrize("fusion", ["max", "min"])
def test_head_fusion(fusion):
    attn = softmax_attention(3, 4, 5, 5, seed=2, temp=3.0)
    np.testing.assert_allclose(rollout(attn, head_fusion=fusion, validate=True),
                               reference_rollout(attn, fusion=fusion), atol=1e-12)


def test_discard_ratio_and_residual_weight():
    attn = softmax_attention(3, 2, 6, 6, seed=3, temp=2.0)
    np.testing.assert_allclose(rollout(attn, discard_ratio=0.4), reference_rollout(attn, discard=0.4), atol=1e-12)
    np.testing.assert_allclose(rollout(attn, residual_weight=0.8), reference_rollout(attn, residual=0.8), atol=1e-12)
    assert not np.allclose(rollout(attn, discard_ratio=0.4), rollout(attn))


def test_start_layer_gives_identity_below():
    attn = softmax_attention(4, 2, 5, 5, seed=4)
    got = rollout(attn, start_layer=2)
    np.testing.assert_allclose(got, reference_rollout(attn, start=2), atol=1e-12)
    np.testing.assert_array_equal(got[:2], np.broadcast_to(np.eye(5), (2, 5, 5)))
    np.testing.assert_allclose(rollout(attn, start_layer=-2), got)


def test_readouts():
    attn = softmax_attention(3, 2, 5, 5, seed=5, causal=True)
    ref = reference_rollout(attn)
    np.testing.assert_allclose(rollout(attn, readout=0), ref[:, 0], atol=1e-12)
    np.testing.assert_allclose(rollout(attn, readout=-1), ref[:, -1], atol=1e-12)
    np.testing.assert_allclose(rollout(attn, readout="mean"), ref.mean(1), atol=1e-12)
    np.testing.assert_allclose(rollout(attn, readout="max"), ref.max(1), atol=1e-12)
    assert rollout(attn, readout=0)[:, 0].min() == pytest.approx(1.0)  # causal: token 0 sees only itself


def test_exclude_tokens_and_renormalise():
    attn = softmax_attention(3, 2, 6, 6, seed=6, causal=True)
    got = rollout(attn, exclude_tokens=[0])
    np.testing.assert_allclose(got, reference_rollout(attn, exclude=(0,)), atol=1e-12)
    np.testing.assert_allclose(got[:, 1:, 0], 0.0)  # nobody attributes to the sink any more
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-12)
    raw = rollout(attn, exclude_tokens=[0], renormalize=False)
    np.testing.assert_allclose(raw, reference_rollout(attn, exclude=(0,), renorm=False), atol=1e-12)


def test_batched_numpy_float32_and_torch_dtype():
    attn = softmax_attention(3, 2, 2, 5, 5, seed=7).astype(np.float32)  # [layer, batch, head, q, k]
    got = rollout(attn, readout=0)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == (3, 2, 5)
    for b in range(2):
        np.testing.assert_allclose(got[:, b], reference_rollout(attn[:, b].astype(float))[:, 0], atol=1e-6)
    tensor = rollout(torch.tensor(attn, dtype=torch.float64))
    assert isinstance(tensor, Float[Tensor, "layer batch query key"]) and tensor.dtype == torch.float64


def test_trace_input():
    attn = softmax_attention(2, 1, 3, 4, 4, seed=8)
    records = [SiteRecord(site=Site("text", layer, "self"), probs=torch.tensor(attn[layer], dtype=torch.float32),
                          n_query=4, n_key=4) for layer in range(2)]
    got = rollout(AttentionTrace(records), readout=0)
    assert got.shape == (2, 1, 4)
    np.testing.assert_allclose(got[:, 0].numpy(), reference_rollout(attn[:, 0])[:, 0], atol=1e-6)


@pytest.mark.parametrize("bad, options", [
    (np.full((3, 4, 4), 0.25), {}),                                    # wrong ndim
    (np.full((2, 1, 3, 3), 0.5), {}),                                  # rows sum to 1.5
    (np.full((2, 1, 3, 4), 0.25), {}),                                 # not square
    (np.array([[[[1.5, -0.5], [0.5, 0.5]]]]), {"validate": False}),    # negative
    (np.full((2, 1, 3, 3), np.nan), {"validate": False}),              # NaN
    (np.full((2, 1, 3, 3), 1 / 3), {"head_fusion": "median"}),
    (np.full((2, 1, 3, 3), 1 / 3), {"readout": 3}),
    (np.full((2, 1, 3, 3), 1 / 3), {"readout": "first"}),
    (np.full((2, 1, 3, 3), 1 / 3), {"start_layer": 2}),
    (np.full((2, 1, 3, 3), 1 / 3), {"discard_ratio": 1.0}),
    (np.full((2, 1, 3, 3), 1 / 3), {"exclude_tokens": [5]}),
    ([[[[1.0]]]], {}),                                                 # a list
])
def test_bad_input_raises(bad, options):
    with pytest.raises(AnalysisError):
        rollout(bad, **options)


def test_validate_false_accepts_unnormalised_rows():
    attn = softmax_attention(2, 1, 3, 3, seed=10) * 1.5
    np.testing.assert_allclose(rollout(attn, validate=False), reference_rollout(attn), atol=1e-12)


def test_attribution_table():
    joint = rollout(softmax_attention(2, 2, 3, 3, seed=9))
    table = attribution_table(joint, tokens=TokenInfo(strings=[["[CLS]", "a", "b"]]), method="rollout",
                              layer_index=[4, 5], readout=0)
    df = table.df
    assert list(df.columns) == ["analysis", "layer", "head", "metric", "value", "token_index", "token"]
    assert set(df.analysis) == {"attribution"} and set(df["head"]) == {-1} and set(df.metric) == {"rollout"}
    np.testing.assert_allclose(df[df.layer == 5].value, joint[1, 0])
    assert list(df[df.layer == 4].token) == ["[CLS]", "a", "b"]
    flat = attribution_table(torch.tensor(joint[:, 0]), method="flow")
    assert list(flat.df.layer.unique()) == [0, 1] and set(flat.df.token) == {""}
    for values, options in [(joint, {}), (joint[:, 0], {"tokens": ["x"]}), (joint[:, 0], {"layer_index": [1]}),
                            (joint[0, 0, 0], {})]:
        with pytest.raises(AnalysisError):
            attribution_table(values, **options)
