"""Prompt suites and generators: determinism per seed, ground-truth invariants, exact JSON round trips."""

import json

import numpy as np
import pytest
import torch

from attnscope.datasets import (PromptItem, PromptSuite, agreement, associative_recall, bigram_backcopy,
                                bigram_transitions, induction, ioi, needle, needle_grid, needle_text, needle_tokens,
                                pad_ids)
from attnscope.errors import CorruptResultError, InputError


class CharTokenizer:
    """A tiny offline tokenizer: one id per character (ord), with offset mappings like a fast tokenizer."""

    pad_token_id = 0
    name_or_path = "char"

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        out = {"input_ids": [ord(c) for c in text]}
        if return_offsets_mapping:
            out["offset_mapping"] = [(i, i + 1) for i in range(len(text))]
        return out


class WordTokenizer:
    """Splits on spaces (a token keeps its leading space); no offset mappings (exercises the prefix fallback)."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        if return_offsets_mapping:
            raise NotImplementedError
        pieces, current = [], ""
        for ch in text:
            if ch == " " and current:
                pieces.append(current)
                current = ""
            current += ch
        if current:
            pieces.append(current)
        return {"input_ids": [sum(map(ord, p)) % 50_000 for p in pieces]}


GENERATORS = {
    "induction": lambda seed: induction(8, seq_len=48, vocab_size=64, seed=seed),
    "needle_tokens": lambda seed: needle_tokens(8, seq_len=40, vocab_size=64, seed=seed),
    "needle_text": lambda seed: needle_text(3, context_length=80, seed=seed),
    "needle_grid": lambda seed: needle_grid([40, 80], [0.0, 0.5, 1.0], seed=seed),
    "associative_recall": lambda seed: associative_recall(8, n_pairs=6, min_pairs=2, vocab_size=64, seed=seed),
    "ioi": lambda seed: ioi(8, seed=seed),
    "ioi_swap": lambda seed: ioi(8, seed=seed, corrupt="swap"),
    "agreement": lambda seed: agreement(8, seq_len=24, vocab_size=48, seed=seed, min_len=10),
    "bigram_backcopy": lambda seed: bigram_backcopy(4, seq_len=48, vocab_size=32, seed=seed),
}


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_same_seed_same_suite_other_seed_other_suite(name):
    make = GENERATORS[name]
    assert make(3) == make(3)
    assert make(3).to_json() == make(3).to_json()
    assert make(3).items != make(4).items
    assert make(3).seed == 3


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_json_round_trip_is_exact(name, tmp_path):
    suite = GENERATORS[name](5)
    assert PromptSuite.from_json(suite.to_json()) == suite
    path = tmp_path / "suite.json"
    suite.to_json(path)
    assert PromptSuite.from_json(path) == suite
    assert json.loads(path.read_text())["format"] == "attnscope.prompt_suite/1"


def test_regenerating_from_the_stored_params_gives_the_same_suite():
    suite = associative_recall(6, n_pairs=5, min_pairs=2, vocab_size=40, seed=9, bos_id=1, first_token=2)
    params = {k: v for k, v in suite.params.items() if k != "n_items"}
    assert associative_recall(suite.params["n_items"], seed=suite.seed, **params) == suite


def test_json_refuses_what_it_cannot_hold():
    with pytest.raises(InputError):
        PromptItem(ids=[1], metadata={"x": object()})
    with pytest.raises(InputError):
        PromptItem(ids=[1], metadata={"x": float("nan")})
    with pytest.raises(InputError):
        PromptItem()
    with pytest.raises(CorruptResultError):
        PromptSuite.from_json('{"format": "something else"}')
    with pytest.raises(CorruptResultError):
        PromptSuite.from_json("{not json")


def test_metadata_tuples_and_numpy_values_become_plain_json():
    item = PromptItem(ids=np.array([1, 2]), metadata={"span": (1, 2), "x": np.int64(3), "y": np.float32(0.5)})
    assert item.ids == [1, 2] and item.metadata == {"span": [1, 2], "x": 3, "y": 0.5}
    suite = PromptSuite("s", [item], seed=np.int64(2))
    assert PromptSuite.from_json(suite.to_json()) == suite


# ---- batching ---------------------------------------------------------------------------------------------------

def test_batches_pad_right_and_left_and_mask():
    suite = PromptSuite("s", [PromptItem(ids=[5, 6, 7]), PromptItem(ids=[8]), PromptItem(ids=[9, 9])])
    batches = list(suite.batches(2, pad_id=0))
    assert [b.indices for b in batches] == [[0, 1], [2]]
    assert batches[0].input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batches[0].attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batches[0].input_ids.dtype == torch.long and set(batches[0].inputs) == {"input_ids", "attention_mask"}
    left = next(suite.batches(2, pad_id=-1, padding_side="left"))
    assert left.input_ids.tolist() == [[5, 6, 7], [-1, -1, 8]]
    assert left.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(InputError):
        next(suite.batches(0))
    with pytest.raises(InputError):
        pad_ids([[1]], padding_side="middle")


def test_text_items_need_a_tokenizer_and_corrupt_batches_use_the_twin():
    suite = ioi(3, seed=0)
    with pytest.raises(InputError):
        next(suite.batches(2))
    tok = CharTokenizer()
    clean = next(suite.batches(3, tokenizer=tok))
    corrupt = next(suite.batches(3, tokenizer=tok, use="corrupt"))
    assert clean.lengths == [len(it.text) for it in suite]
    assert corrupt.lengths == [len(it.corrupt_text) for it in suite]
    with pytest.raises(InputError):
        next(induction(2, seq_len=16, vocab_size=32, seed=0).batches(2, use="corrupt"))


# ---- induction ----------------------------------------------------------------------------------------------------

def test_induction_repeats_with_a_period_that_varies_per_item():
    suite = induction(64, seq_len=64, vocab_size=128, seed=1, bos_id=0, first_token=1)
    periods = set()
    for item in suite:
        ids, meta = item.ids, item.metadata
        p, (start, end), (s0, s1) = meta["period"], meta["repeat_span"], meta["segment_span"]
        periods.add(p)
        assert len(ids) == 64 and end == 64 and ids[0] == 0 and 0 not in ids[1:]
        assert s1 - s0 == p and start == s1 and s0 == 1 + meta["prefix_len"]
        assert all(ids[t] == ids[t - p] for t in range(start, end))
        assert len(set(ids[1:start])) == start - 1  # distinct: every repeat is unambiguous
        assert end - start >= p  # at least one full repeat
    assert len(periods) >= 10
    assert min(periods) >= suite.params["min_period"] and max(periods) <= suite.params["max_period"]


def test_induction_rejects_periods_that_do_not_fit():
    with pytest.raises(InputError):
        induction(2, seq_len=16, vocab_size=32, min_period=4, max_period=9)
    with pytest.raises(InputError):
        induction(2, seq_len=16, vocab_size=32, min_period=5, max_period=4)


# ---- needles ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0, None])
def test_token_needle_span_holds_the_needle_and_the_answer_is_its_rest(depth):
    suite = needle_tokens(20, seq_len=48, vocab_size=64, needle_len=5, cue_len=2, depth=depth, seed=2, bos_id=0,
                          sep_id=1, first_token=2)
    hay_lo, hay_hi = suite.params["haystack_range"]
    for item in suite:
        meta, ids = item.metadata, item.ids
        s, e = meta["needle_span"]
        assert len(ids) == 48 and ids[0] == 0 and ids[-3] == 1
        assert ids[s:e] == meta["needle"] and len(set(meta["needle"])) == 5
        assert ids[-2:] == meta["needle"][:2] == ids[s:s + 2]
        assert item.answer_ids == meta["needle"][2:] == ids[slice(*meta["answer_span"])]
        hay = ids[1:s] + ids[e:-3]
        assert all(hay_lo <= t < hay_hi for t in hay) and not set(hay) & set(meta["needle"])
        if depth is not None:
            assert s - 1 == round(depth * len(hay))


def test_text_needle_and_grid():
    grid = needle_grid([40, 120], [0.0, 0.5, 1.0], n_per_cell=2, seed=3)
    assert len(grid) == 12
    cells = [(it.metadata["context_length"], it.metadata["depth"]) for it in grid]
    assert cells == [(n, d) for n in (40, 120) for d in (0.0, 0.5, 1.0) for _ in range(2)]
    for item in grid:
        meta = item.metadata
        a, b = meta["needle_span_chars"]
        assert item.text[a:b] == meta["needle_text"] and meta["needle_text"].startswith("The secret code of the")
        code = item.answer_text.strip()
        assert item.text[slice(*meta["answer_span_chars"])] == code and len(code) == 4 and code.isdigit()
        assert item.text.endswith(" is") and meta["needle_text"][:-1].split(" is ")[0].lower() in item.text.lower()
        words = len(item.text.split("\n\n")[0].split()) - len(meta["needle_text"].split())
        assert words <= meta["context_length"]
    first, last = grid[0], grid[4]
    assert first.metadata["needle_span_chars"][0] == 0  # depth 0: the needle opens the context
    assert last.text.split("\n\n")[0].endswith(last.metadata["needle_text"])  # depth 1: it closes it
    assert grid.params["lengths"] == [40, 120]


@pytest.mark.parametrize("tok", [CharTokenizer(), WordTokenizer()])
def test_text_needle_token_spans_with_a_tokenizer(tok):
    suite = needle_text(4, context_length=60, depth=None, seed=5, tokenizer=tok)
    for item in suite:
        s, e = item.metadata["needle_span"]
        assert 0 <= s < e <= len(item.ids)
        assert item.answer_ids == tok(item.answer_text)["input_ids"]
        if isinstance(tok, CharTokenizer):
            a, b = item.metadata["needle_span_chars"]
            assert (s, e) == (a, b)
    tokens_suite = needle_text(2, context_length=300, unit="tokens", tokenizer=tok, seed=1)
    assert all(len(it.ids) > 0 for it in tokens_suite)
    with pytest.raises(InputError):
        needle_text(1, unit="tokens")


def test_needle_dispatches_on_form():
    assert needle(2, seq_len=32, vocab_size=64, seed=0) == needle_tokens(2, seq_len=32, vocab_size=64, seed=0)
    assert needle(1, form="text", context_length=50, seed=0) == needle_text(1, context_length=50, seed=0)
    with pytest.raises(InputError):
        needle(1, form="audio")


# ---- associative recall ---------------------------------------------------------------------------------------------

def test_mqar_answers_are_the_values_of_the_queried_keys():
    suite = associative_recall(30, n_pairs=8, min_pairs=2, vocab_size=128, seed=4, bos_id=1, first_token=2)
    counts = set()
    for item in suite:
        ids, meta = item.ids, item.metadata
        pairs = dict(map(tuple, meta["pairs"]))
        counts.add(meta["n_pairs"])
        assert len(pairs) == meta["n_pairs"] == len(meta["queries"])  # distinct keys, every key queried
        assert ids[0] == 1
        k0, k1 = meta["kv_span"]
        assert [[ids[i], ids[i + 1]] for i in range(k0, k1, 2)] == meta["pairs"]
        full = ids + item.answer_ids
        for q in meta["queries"]:
            assert full[q["position"]] == q["key"] and pairs[q["key"]] == q["answer"] == full[q["position"] + 1]
            assert ids[q["value_position"]] == q["answer"] and ids[q["key_position"]] == q["key"]
        assert item.answer_ids == [pairs[ids[-1]]]
        lo, hi = suite.params["key_range"]
        assert all(lo <= k < hi for k in pairs) and all(v >= hi for v in pairs.values())
    assert len(counts) > 3


def test_mqar_query_count_and_ranges_are_checked():
    suite = associative_recall(5, n_pairs=6, n_queries=2, vocab_size=64, seed=0)
    assert all(len(it.metadata["queries"]) == 2 for it in suite)
    with pytest.raises(InputError):
        associative_recall(1, n_pairs=40, vocab_size=64)
    with pytest.raises(InputError):
        associative_recall(1, n_pairs=4, vocab_size=64, key_range=(10, 5))


# ---- IOI ------------------------------------------------------------------------------------------------------------

def test_ioi_clean_and_corrupt_pairs():
    for item in ioi(40, seed=6, corrupt="abc"):
        meta, text = item.metadata, item.text
        io, s = meta["io"], meta["s"]
        assert item.answer_text == " " + io and meta["wrong_answer_text"] == " " + s
        assert text[slice(*meta["io_chars"])] == io and text[slice(*meta["s1_chars"])] == s
        assert text[slice(*meta["s2_chars"])] == s and meta["s2_chars"][0] > max(meta["io_chars"][0],
                                                                             meta["s1_chars"][0])
        assert text.count(io) == 1 and text.count(s) == 2 and text.endswith(" to")
        assert (meta["io_chars"][0] < meta["s1_chars"][0]) == (meta["order"] == "ABBA") and item.label == meta["order"]
        x, y, z = meta["corrupt_names"]
        assert len({x, y, z, io, s}) == 5 and all(n in item.corrupt_text for n in (x, y, z))
        assert io not in item.corrupt_text and s not in item.corrupt_text
    for item in ioi(20, seed=6, corrupt="swap", order="BABA"):
        meta = item.metadata
        assert meta["order"] == "BABA" and item.corrupt_text.count(meta["io"]) == 2
        assert item.corrupt_text.count(meta["s"]) == 1 and meta["corrupt_answer_text"] == " " + meta["s"]
    with pytest.raises(InputError):
        ioi(1, corrupt="shuffle")


def test_ioi_token_positions_with_a_tokenizer():
    tok = WordTokenizer()
    for item in ioi(10, seed=1, tokenizer=tok):
        meta = item.metadata
        assert item.ids[meta["io_pos"]] == tok(" " + meta["io"])["input_ids"][0]
        assert item.ids[meta["s2_pos"]] == item.ids[meta["s1_pos"]] == meta["wrong_answer_ids"][0]
        assert meta["end_pos"] == len(item.ids) - 1 and item.corrupt_ids == tok(item.corrupt_text)["input_ids"]


# ---- agreement ------------------------------------------------------------------------------------------------------

def test_agreement_label_is_the_class_of_the_token_after_the_single_marker():
    suite = agreement(60, seq_len=32, vocab_size=64, seed=7, n_classes=4, tokens_per_class=3, min_len=12)
    p, class_of = suite.params, suite.metadata["class_of_token"]
    labels, lengths = set(), set()
    distractors = 0
    for item in suite:
        ids, meta = item.ids, item.metadata
        m = meta["marker_position"]
        assert ids[0] == p["cls_id"] and ids.count(p["marker_id"]) == 1 and ids[m] == p["marker_id"]
        assert meta["class_position"] == m + 1 and ids[m + 1] == meta["class_token"]
        assert class_of[str(ids[m + 1])] == item.label
        distractors += sum(str(t) in class_of for i, t in enumerate(ids) if i != m + 1)
        labels.add(item.label)
        lengths.add(len(ids))
    assert labels == {0, 1, 2, 3} and len(lengths) > 5 and distractors > 20
    with pytest.raises(InputError):
        agreement(1, vocab_size=8, n_classes=4, tokens_per_class=2)


# ---- bigram-backcopy -------------------------------------------------------------------------------------------------

def test_bigram_backcopy_copies_after_triggers_and_follows_the_chain_elsewhere():
    probs = bigram_transitions(32, 3, chain_seed=0)
    assert np.allclose(probs[[0] + list(range(4, 32))].sum(1), 1.0) and probs[:, 0].sum() == 0
    suite = bigram_backcopy(20, seq_len=64, vocab_size=32, seed=8)
    n_trig = 0
    for item in suite:
        ids, trig = item.ids, set(item.metadata["trigger_positions"])
        assert ids[0] == 0 and 0 not in ids[1:]
        for t in range(1, 63):
            if 1 <= ids[t] <= 3:
                assert t in trig and ids[t + 1] == ids[t - 1] and not 1 <= ids[t - 1] <= 3
            else:
                assert t not in trig and probs[ids[t], ids[t + 1]] > 0
        n_trig += len(trig)
    assert n_trig > 40
