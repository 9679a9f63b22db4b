"""Behavioural checks of the head scores on trained organisms (ground truth from their cards) and the real MiniLM.

Every suite here is drawn with a seed the organisms never trained or were carded on.
"""

import pytest

import attnscope
from attnscope import zoo
from attnscope.circuits import detectors, retrieval_heads as retrieval, attention_sinks as sinks
from attnscope.datasets import sentences
from attnscope.datasets import associative_recall, induction

SEED = 424242


def _card(name):
    card = zoo.load_card(name)
    params = {k: v for k, v in card["data"]["params"].items() if k != "n_items"}
    heads = {role: {(int(h[1:].split("H")[0]), int(h.split("H")[1])) for h in names}
             for role, names in card["ground_truth_heads"].items()}
    return card, params, heads


def _ranked(table, metric="score", n=None):
    df = table.df[(table.df.metric == metric) & (table.df["head"] >= 0)].sort_values("value", ascending=False)
    return [(int(r.layer), int(r.head)) for r in df.head(n).itertuples()]


@pytest.fixture(scope="module")
def induction_2l():
    card, params, heads = _card("induction-2l")
    return attnscope.load("zoo:induction-2l"), induction(32, seed=SEED, **params), heads


def test_induction_and_previous_token_detectors_rank_the_card_heads_first(induction_2l):
    model, suite, heads = induction_2l
    ind = detectors.induction_scores(model, suite, progress=False)
    assert set(_ranked(ind, n=len(heads["induction"]))) == heads["induction"]
    prev = detectors.previous_token_scores(model, suite, progress=False)
    assert set(_ranked(prev, n=len(heads["previous_token"]))) == heads["previous_token"]
    best = ind.df[ind.df.metric == "score"]["value"].max()
    assert best > 0.5  # the induction head really does attend to the token after the first occurrence


def test_retrieval_scoring_flags_the_recall_heads():
    card, params, heads = _card("recall-llama")
    model = attnscope.load("zoo:recall-llama")
    suite = associative_recall(12, seed=SEED, **params)
    result = retrieval.retrieval_scores(model, suite, progress=False)
    assert result.table.provenance["n_counted"] >= 9  # the organism answers most items
    assert heads["retrieval"] <= set(result.heads)
    assert set(sorted(result.scores, key=lambda k: -result.scores[k])[:len(heads["retrieval"])]) == heads["retrieval"]
    assert len(result.heads) < len(result.scores)  # sparse: not every head copies


@pytest.fixture(scope="module")
def sink_lm():
    from attnscope.datasets import bigram_backcopy

    card, params, heads = _card("sink-lm")
    return attnscope.load("zoo:sink-lm"), bigram_backcopy, params, heads


def test_sink_scores_find_the_bos_sink_of_sink_lm(sink_lm):
    model, generator, params, heads = sink_lm
    assert heads["sink"], "the sink-lm card names no sink head"
    table = sinks.sink_scores(model, generator(16, seed=SEED, **params), progress=False)
    scores = table.df.set_index(["layer", "head", "metric"])["value"]
    assert all(scores[(l, h, "sink_score:pos0")] > 0.3 for l, h in heads["sink"])
    assert set(_ranked(table, "sink_score:pos0", len(heads["sink"]))) == heads["sink"]
    n_heads = len({(l, h) for l, h, m in scores.index if h >= 0})
    assert scores[(-1, -1, "sink_fraction:pos0")] == pytest.approx(len(heads["sink"]) / n_heads)
    # position 0 holds BOS, a special token: its label scores the same; an ordinary key gets far less
    labels = {m.split(":", 1)[1] for _, _, m in scores.index if m.startswith("sink_score:")} - {"pos0", "other"}
    assert len(labels) == 1
    bos = labels.pop()
    for l, h in heads["sink"]:
        assert scores[(l, h, f"sink_score:{bos}")] == scores[(l, h, "sink_score:pos0")]
        assert scores[(l, h, "sink_score:other")] < 0.1


def test_minilm_cls_is_the_dominant_sink_in_the_middle_layers(minilm):
    table = sinks.sink_scores(minilm, sentences(8, seed=SEED), progress=False)
    df = table.df[table.df["head"] >= 0]
    means = df.groupby(["layer", "metric"])["value"].mean()
    for layer in (1, 2, 3, 4):
        cls, sep, other = (means[(layer, f"sink_score:{t}")] for t in ("[CLS]", "[SEP]", "other"))
        assert cls > 0.3 and cls > 5 * sep and cls > 5 * other, (layer, cls, sep, other)
