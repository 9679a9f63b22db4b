"""Attention flow against networkx max-flow on the graph built from the definition, and analytic cases."""

import networkx as nx
import numpy as np
import pytest
import torch
from jaxtyping import Float
from torch import Tensor

from attnscope.circuits._flow_layers import flow_values
from attnscope.circuits.flow import attention_flow
from attnscope.errors import AnalysisError

TOL = 1e-9  # the definition asks for 1e-6; the integer solver is exact up to ~1e-15 here


def softmax_attention(*shape, temp=1.0, seed=0, causal=False):
    logits = np.random.default_rng(seed).standard_normal(shape) * temp
    if causal:
        logits = np.where(np.tril(np.ones(shape[-2:], bool)), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def oracle(attn, residual=0.5):
    """Raw flow values [layer, n, n] from networkx: A_hat = rownorm(r I + (1-r) mean_h A); arcs (l,i)->(l-1,j)."""
    n_layers, _, n, _ = attn.shape
    graph = nx.DiGraph()
    out = np.zeros((n_layers, n, n))
    for layer in range(1, n_layers + 1):
        a_hat = residual * np.eye(n) + (1 - residual) * attn[layer - 1].mean(0)
        a_hat /= a_hat.sum(1, keepdims=True)
        for i in range(n):
            for j in range(n):
                if a_hat[i, j] > 0:
                    graph.add_edge((layer, i), (layer - 1, j), capacity=a_hat[i, j])
        for i in range(n):
            for j in range(n):
                out[layer - 1, i, j] = nx.maximum_flow_value(graph, (layer, i), (0, j)) if (0, j) in graph else 0.0
    return out


@pytest.mark.parametrize("n_layers, n, temp, causal, seed", [
    (3, 7, 8.0, False, 0),   # peaked
    (3, 8, 8.0, True, 1),    # peaked, causal
    (2, 5, 8.0, False, 2),
    (4, 6, 1.0, False, 3),   # diffuse: deep layers settle by the bounds
    (3, 6, 3.0, True, 4),
])
def test_matches_networkx(n_layers, n, temp, causal, seed):
    attn = softmax_attention(n_layers, 2, n, n, temp=temp, seed=seed, causal=causal)
    values, raw = attention_flow(attn, return_raw=True)
    expected = oracle(attn)
    np.testing.assert_allclose(raw, expected, atol=TOL, rtol=0)
    np.testing.assert_allclose(values, expected / expected.sum(-1, keepdims=True), atol=TOL, rtol=0)
    assert raw.max() <= expected.max() + TOL


def test_bounds_and_solver_paths_both_exercised_and_exact():
    attn = softmax_attention(5, 1, 6, 6, temp=1.0, seed=5)
    stats = {}
    a_hat = 0.5 * np.eye(6) + 0.5 * attn[:, 0]
    values = flow_values(a_hat / a_hat.sum(-1, keepdims=True), 5, stats)
    assert stats["settled"] > 3 * 36 and stats["solved"] > 0
    np.testing.assert_allclose(values / stats["quantum"], oracle(attn), atol=TOL, rtol=0)
    subset = flow_values(a_hat / a_hat.sum(-1, keepdims=True), 5, sinks=[4, 1])
    np.testing.assert_array_equal(subset, values[..., [4, 1]])
    public = {}
    attention_flow(attn, stats=public)
    assert public["settled"] + public["solved"] == 5 * 36


def test_one_layer_flow_is_the_augmented_attention():
    attn = softmax_attention(1, 3, 6, 6, temp=4.0, seed=6)
    a_hat = 0.5 * np.eye(6) + 0.5 * attn[0].mean(0)
    np.testing.assert_allclose(attention_flow(attn, normalize=False)[0], a_hat, atol=TOL)
    np.testing.assert_allclose(attention_flow(attn)[0], a_hat, atol=TOL)


def test_identity_attention_gives_identity():
    attn = np.broadcast_to(np.eye(5), (3, 2, 5, 5)).copy()
    np.testing.assert_array_equal(attention_flow(attn), np.broadcast_to(np.eye(5), (3, 5, 5)))


def test_all_mass_on_token_zero():
    n = 4
    attn = np.zeros((3, 1, n, n))
    attn[..., 0] = 1.0  # every query attends to token 0
    raw = attention_flow(attn, normalize=False)
    # layer 1: A_hat itself; deeper: a full unit reaches token 0 and the residual chain keeps 0.5 on the token
    expected_deep = np.zeros((n, n))
    expected_deep[:, 0] = 1.0
    expected_deep[np.arange(1, n), np.arange(1, n)] = 0.5
    np.testing.assert_allclose(raw[0], 0.5 * np.eye(n) + 0.5 * attn[0, 0], atol=TOL)
    np.testing.assert_allclose(raw[1:], np.broadcast_to(expected_deep, (2, n, n)), atol=TOL)
    np.testing.assert_allclose(attention_flow(attn)[-1, 1], [2 / 3, 1 / 3, 0, 0], atol=TOL)


def test_layers_option_kinds_and_networkx_backend():
    attn = softmax_attention(3, 2, 2, 5, 5, temp=8.0, seed=7).astype(np.float32)  # batched
    full = attention_flow(attn)
    assert isinstance(full, np.ndarray) and full.dtype == np.float32 and full.shape == (3, 2, 5, 5)
    np.testing.assert_array_equal(attention_flow(attn, layers=[-1, 0]), full[[2, 0]])
    np.testing.assert_array_equal(attention_flow(attn, layers=1), full[[1]])
    tensor = attention_flow(torch.tensor(attn[:, 0], dtype=torch.float64))
    assert isinstance(tensor, Float[Tensor, "layer query key"]) and tensor.dtype == torch.float64
    np.testing.assert_allclose(tensor.numpy(), full[:, 0], atol=1e-6)
    reference = attention_flow(attn[:, :1].astype(float), backend="networkx", normalize=False)
    np.testing.assert_allclose(attention_flow(attn[:, :1].astype(float), normalize=False, threads=1), reference,
                               atol=TOL)


@pytest.mark.parametrize("bad, options", [
    (np.full((3, 4, 4), 0.25), {}),                                  # wrong ndim
    (np.full((2, 1, 3, 3), 0.5), {}),                                # rows sum to 1.5
    (np.array([[[[1.5, -0.5], [0.5, 0.5]]]]), {"validate": False}),  # negative values
    (np.full((2, 1, 3, 4), 0.25), {}),                               # not square
    (np.full((2, 1, 3, 3), 1 / 3), {"backend": "scipy"}),
    (np.full((2, 1, 3, 3), 1 / 3), {"layers": [2]}),
    (np.full((2, 1, 3, 3), 1 / 3), {"layers": []}),
    (np.full((2, 1, 3, 3), 1 / 3), {"head_fusion": "sum"}),
    (np.full((2, 1, 3, 3), 1 / 3), {"threads": 0}),
])
def test_bad_input_raises(bad, options):
    with pytest.raises(AnalysisError):
        attention_flow(bad, **options)
