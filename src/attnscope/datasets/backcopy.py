"""Bigram-Backcopy (Guo et al. 2024): a fixed Markov chain, except that after a trigger token the previous token
is copied. Small transformers trained on it grow an attention sink on the BOS token (active-dormant heads).

Sequence: ``[bos] x_1 x_2 ...``; ``x_1`` and every token after a non-trigger come from the chain's row of the
previous token; when ``x_t`` is a trigger, ``x_{t+1} = x_{t-1}``. Triggers never follow a trigger. Ids: ``bos_id``
(default 0), triggers ``1..n_triggers``, then ordinary tokens. The chain is fixed by ``chain_seed`` (shared by
training and held-out suites), the sequences by ``seed``. Metadata: ``trigger_positions`` (query positions whose
next token is a back-copy of position ``t - 1``).

Example:
    >>> from attnscope.datasets import bigram_backcopy
    >>> item = bigram_backcopy(1, seq_len=32, vocab_size=32, seed=0)[0]
    >>> all(item.ids[t + 1] == item.ids[t - 1] for t in item.metadata["trigger_positions"] if t + 1 < 32)
    True
"""

import numpy as np

from ..errors import InputError
from .suite import PromptItem, PromptSuite


def bigram_transitions(vocab_size: int, n_triggers: int = 3, chain_seed: int = 0, *, alpha: float = 0.2,
                       trigger_rate: float = 0.1) -> np.ndarray:
    """Row-stochastic ``[vocab, vocab]`` chain: Dirichlet(alpha) rows over ordinary tokens, plus ``trigger_rate``
    spread over the triggers from ordinary tokens; BOS is never a target, trigger rows are unused (zeros)."""
    if not 1 <= n_triggers < vocab_size - 2:
        raise InputError("bad trigger count", expected=f"1 <= n_triggers < {vocab_size - 2}", got=n_triggers)
    rng = np.random.default_rng(chain_seed)
    first = 1 + n_triggers
    probs = np.zeros((vocab_size, vocab_size))
    rows = rng.dirichlet(np.full(vocab_size - first, alpha), size=vocab_size)
    probs[:, first:] = rows * (1 - trigger_rate)
    probs[:, 1:first] = trigger_rate / n_triggers
    probs[1:first] = 0.0
    probs[0, 1:first] = 0.0
    probs[0] /= probs[0].sum()
    return probs


def bigram_backcopy(n_items: int, seq_len: int = 64, vocab_size: int = 64, seed: int = 0, *, n_triggers: int = 3,
                    chain_seed: int = 0, alpha: float = 0.2, trigger_rate: float = 0.1, bos_id: int = 0,
                    name: str = "bigram_backcopy") -> PromptSuite:
    """Sequences of ``seq_len`` tokens (BOS included) from the Bigram-Backcopy process."""
    if bos_id != 0:
        raise InputError("bigram_backcopy reserves id 0 for BOS", expected=0, got=bos_id)
    if seq_len < 3:
        raise InputError("sequence too short", expected="seq_len >= 3", got=seq_len)
    probs = bigram_transitions(vocab_size, n_triggers, chain_seed, alpha=alpha, trigger_rate=trigger_rate)
    cdf = np.cumsum(probs, axis=1)
    rng = np.random.default_rng(seed)
    uniforms = rng.random((int(n_items), seq_len))  # row i = what item i draws, in order
    ids = np.zeros((int(n_items), seq_len), dtype=np.int64)
    ids[:, 0] = bos_id
    is_trigger = np.zeros_like(ids, dtype=bool)
    for t in range(1, seq_len):  # vectorised over items: each step depends on the previous two tokens
        prev = ids[:, t - 1]
        is_trigger[:, t - 1] = (prev >= 1) & (prev <= n_triggers)
        rows = cdf[prev]
        sampled = np.minimum((rows <= (uniforms[:, t] * rows[:, -1])[:, None]).sum(1), vocab_size - 1)
        ids[:, t] = np.where(is_trigger[:, t - 1], ids[:, max(t - 2, 0)], sampled)
    items = []
    for row in range(int(n_items)):
        seq = [int(v) for v in ids[row]]
        triggers = [int(t) for t in np.flatnonzero(is_trigger[row, :-1])]
        items.append(PromptItem(ids=seq, metadata={"trigger_positions": triggers,
                                                   "ends_with_trigger": bool(1 <= seq[-1] <= n_triggers)}))
    params = {"n_items": int(n_items), "seq_len": int(seq_len), "vocab_size": int(vocab_size),
              "n_triggers": int(n_triggers), "chain_seed": int(chain_seed), "alpha": float(alpha),
              "trigger_rate": float(trigger_rate), "bos_id": int(bos_id)}
    return PromptSuite(name, items, seed=seed, generator="bigram_backcopy", params=params,
                       metadata={"task": "next token: bigram chain, except back-copy after a trigger",
                                 "trigger_ids": list(range(1, n_triggers + 1))})
