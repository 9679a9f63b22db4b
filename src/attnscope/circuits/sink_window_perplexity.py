"""The StreamingLLM check (Xiao et al. 2023, arXiv 2309.17453): windowed-decoding perplexity on a long sequence
with a window of ``W`` recent tokens plus ``k`` kept initial (sink) tokens, for ``k`` in ``n_sinks`` (0, 1, 4).

Each target token ``t`` is predicted from the ``k`` first tokens of the stream plus the ``W`` most recent tokens
(the current one included), with positions assigned by index in that context (``0 .. k + W - 1``), as StreamingLLM
assigns positions by cache index. Two ways to run the window:

- ``mode="recompute"`` (default): every window is re-encoded from scratch (one forward of ``k + W`` tokens per
  target, batched). This is the paper's "sliding window with re-computation" when ``k = 0``. Because the window's
  first token is re-encoded at position 0, it can take the sink role itself: a model whose sink is position-based
  stays fine at ``k = 0`` here; only a model whose sink is a specific token (e.g. a BOS that never reappears) breaks.
- ``mode="cache"``: StreamingLLM proper. One token at a time through a rolling KV cache: keys and values are
  computed once, when the token arrives with everything before it in the cache; at eviction the oldest non-sink
  entry is dropped and the remaining recent keys move one position down (RoPE keys are re-rotated by ``-1``;
  absolute position embeddings are baked into the cached states and stay). ``k = 0`` is the paper's "window
  attention", whose perplexity explodes once the initial tokens are evicted; ``k = 4`` restores it. Supported for
  Llama-class (RoPE) and GPT-2-class (absolute positions) models with a dynamic cache.

``perplexity`` is measured on the targets that see an evicted context in every setting (``t > max(k) + W``);
``perplexity_all`` on every target; the dense baseline (``setting = "dense"``, whole prefix visible) is added when
the stream fits the model.

Example:
    >>> import torch, transformers
    >>> from attnscope.circuits.sink_window_perplexity import streaming_perplexity
    >>> cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                                num_attention_heads=2, max_position_embeddings=64)
    >>> model = transformers.LlamaForCausalLM(cfg).eval()
    >>> table = streaming_perplexity(model, torch.randint(0, 32, (48,)), window=8, n_sinks=(0, 4), progress=False)
    >>> sorted(table.df["setting"].unique())
    ['dense', 'sink+window']
"""

import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..datasets.suite import PromptSuite
from ..errors import AnalysisError, InputError
from ..probes import attention_modules
from ..probes.adapter import ModelLike, as_adapter
from ..probes.kv_cache import forward_with_cache
from ..results import ResultTable
from .detectors import encode_suite, progress_bar
from .registry import register_analysis

MODES = ("recompute", "cache")


def _nll(logits: Tensor, targets: Tensor) -> Tensor:
    return -torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None]).squeeze(-1)


@torch.no_grad()
def dense_nll(module: Any, ids: Tensor) -> Tensor:
    """NLL of targets ``1 .. T-1`` with the whole prefix visible."""
    logits = module(input_ids=ids[None]).logits[0, :-1]
    return _nll(logits, ids[1:])


@torch.no_grad()
def recompute_nll(module: Any, ids: Tensor, n_sink: int, window: int, batch_size: int = 32,
                  progress: bool = False) -> Tensor:
    """NLL of targets ``1 .. T-1``, each from ``ids[:n_sink] + ids[t-window:t]`` re-encoded at positions 0.."""
    T, cap = len(ids), n_sink + window
    head = min(cap, T - 1)
    nll = [_nll(module(input_ids=ids[None, :head]).logits[0], ids[1:head + 1])]  # targets 1..cap: no eviction
    targets = list(range(cap + 1, T))
    for start in progress_bar(range(0, len(targets), batch_size), -(-len(targets) // batch_size),
                              f"recompute k={n_sink}", progress):
        ts = targets[start:start + batch_size]
        ctx = torch.stack([torch.cat([ids[:n_sink], ids[t - window:t]]) for t in ts])
        nll.append(_nll(module(input_ids=ctx).logits[:, -1], ids[ts]))
    return torch.cat(nll)


def _key_shift(module: Any) -> Callable[[Tensor, int], Tensor] | None:
    """A function re-rotating cached RoPE keys by ``delta`` positions; None for absolute position embeddings."""
    base = getattr(module, "model", None) or getattr(module, "transformer", None) or module
    rotary = getattr(base, "rotary_emb", None)
    if rotary is None:
        if hasattr(base, "wpe"):
            return None
        raise AnalysisError("cache mode needs RoPE or absolute positions", expected="Llama-class or GPT-2-class",
                            got=type(module).__name__, fix="use mode='recompute'")

    attn = attention_modules(module)[0][1]
    apply = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
    if apply is None:
        raise AnalysisError("cannot find the model's apply_rotary_pos_emb", expected="a Llama-class model",
                            got=type(attn).__module__, fix="use mode='recompute'")
    scale = float(getattr(rotary, "attention_scaling", 1.0) or 1.0)

    def shift(keys: Tensor, delta: int) -> Tensor:
        cos, sin = rotary(keys, torch.full((1, 1), delta, device=keys.device))
        return apply(keys, keys, cos / scale, sin / scale)[1]
    return shift


def _evict(cache: Any, n_sink: int, shift: Callable[[Tensor, int], Tensor] | None) -> None:
    for layer in cache.layers:
        if getattr(layer, "is_sliding", False) or not hasattr(layer, "keys"):
            raise AnalysisError("cache mode needs a plain dynamic cache", expected="DynamicLayer",
                                got=type(layer).__name__, fix="use mode='recompute'")
        keys, values = layer.keys, layer.values
        recent = keys[:, :, n_sink + 1:]
        if shift is not None:
            recent = shift(recent, -1)
        layer.keys = torch.cat([keys[:, :, :n_sink], recent], 2)
        layer.values = torch.cat([values[:, :, :n_sink], values[:, :, n_sink + 1:]], 2)


@torch.no_grad()
def cache_nll(module: Any, ids: Tensor, n_sink: int, window: int, progress: bool = False) -> Tensor:
    """NLL of targets ``1 .. T-1`` through a rolling KV cache of ``n_sink`` initial + ``window`` recent entries."""
    from transformers import DynamicCache

    shift = _key_shift(module)
    cache = DynamicCache(config=module.config)
    cap, nll = n_sink + window, []
    for t in progress_bar(range(len(ids) - 1), len(ids) - 1, f"cache k={n_sink}", progress):
        length = cache.get_seq_length()
        if length >= cap:
            _evict(cache, n_sink, shift)
            length -= 1
        logits, cache = forward_with_cache(module, ids[None, t:t + 1], cache,
                                           position_ids=torch.tensor([[length]], device=ids.device))
        nll.append(_nll(logits[0, -1], ids[t + 1]))
    return torch.stack(nll)


def _row(setting: str, metric: str, nll: Tensor, **extra: Any) -> dict:
    value = math.exp(float(nll.mean())) if len(nll) else float("nan")
    return {"analysis": "streaming_llm", "layer": -1, "head": -1, "metric": metric, "value": value,
            "setting": setting, "n_targets": int(len(nll)), **extra}


def streaming_perplexity(model: ModelLike, ids: "Tensor | Sequence[int]", *, window: int = 64,
                         n_sinks: Sequence[int] = (0, 1, 4), mode: str = "recompute", dense: bool = True,
                         batch_size: int = 32, progress: bool = True) -> ResultTable:
    """Perplexity per number of kept sink tokens (see the module docstring); one row per (setting, metric)."""
    if mode not in MODES:
        raise InputError("unknown window mode", expected=MODES, got=mode)
    adapter = as_adapter(model)
    module = adapter.module
    if adapter.info().family != "causal-lm" or not hasattr(module, "generate"):
        raise AnalysisError("windowed perplexity needs a causal LM with an LM head", expected="a causal LM",
                            got=f"{type(module).__name__} ({adapter.info().family})")
    device = next(module.parameters()).device
    ids = torch.as_tensor(list(ids) if not torch.is_tensor(ids) else ids, dtype=torch.long).flatten().to(device)
    if window < 1 or any(k < 0 for k in n_sinks):
        raise InputError("bad window", expected="window >= 1, n_sinks >= 0", got=(window, list(n_sinks)))
    if len(ids) <= max(n_sinks) + window + 1:
        raise InputError("sequence too short to evict anything", expected=f"> {max(n_sinks) + window + 1} tokens",
                         got=len(ids), fix="use a longer suite (more items) or a smaller --window")
    rows = []
    cap = max(n_sinks) + window  # every setting is scored on the same targets: t > max(k) + W
    max_pos = adapter.info().max_positions
    if dense and (max_pos is None or len(ids) <= max_pos):
        nll = dense_nll(module, ids)
        rows += [_row("dense", "perplexity", nll[cap:], window=window), _row("dense", "perplexity_all", nll)]
    for k in n_sinks:
        nll = (recompute_nll(module, ids, k, window, batch_size, progress) if mode == "recompute"
               else cache_nll(module, ids, k, window, progress))
        extra = {"n_sink": int(k), "window": int(window), "mode": mode}
        rows += [_row("sink+window", "perplexity", nll[cap:], **extra),
                 _row("sink+window", "perplexity_all", nll, **extra)]
    return ResultTable.from_records(rows, provenance=dict(adapter.provenance(), analysis="streaming_llm", mode=mode,
                                                          window=window, n_tokens=len(ids),
                                                          main_metric="perplexity"))


def suite_stream(suite: PromptSuite, tokenizer: Any, length: int | None = None) -> list[int]:
    """One long token stream: the suite's items concatenated (text tokenised without special tokens, with the
    tokenizer's BOS once in front when it uses one), cut to ``length`` tokens."""
    encoded = encode_suite(suite, tokenizer, add_special_tokens=False)
    stream = [t for e in encoded for t in e.ids]
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    if bos is not None and tokenizer("a")["input_ids"][:1] == [bos]:
        stream = [int(bos)] + stream
    return stream[:length] if length else stream


@register_analysis("streaming-llm", description="StreamingLLM check: windowed perplexity with 0/1/4 kept sink "
                   "tokens (recompute or rolling-cache windows)")
def streaming_llm(model: ModelLike, suite: PromptSuite, *, window: int = 64, n_sinks: Sequence[int] = (0, 1, 4),
                  mode: str = "recompute", length: int | None = None, dense: bool = True, batch_size: int = 32,
                  progress: bool = True, **_: Any) -> ResultTable:
    """``streaming_perplexity`` on the suite's items concatenated into one stream."""
    adapter = as_adapter(model)
    table = streaming_perplexity(adapter, suite_stream(suite, adapter.tokenizer, length), window=window,
                                 n_sinks=n_sinks, mode=mode, dense=dense, batch_size=batch_size, progress=progress)
    table.provenance.update({"suite": suite.name, "suite_params": suite.params})
    return table
