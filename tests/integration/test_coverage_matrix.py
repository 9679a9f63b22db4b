"""The coverage matrix (``attnscope/probes/coverage.json``, ``docs/architectures.md``) is what the checks find.

Every architecture of the catalogue is re-checked against independent references (the models' own eager
attention weights; intervention edits written without attnscope code) and must give exactly its shipped row: a
regression or an improvement shows up as a diff, fixed by ``python -m attnscope.probes.coverage --write``. Planted
bugs show that the checks can fail.
"""

import pytest
import torch
import transformers

from attnscope.cli import main
from attnscope.probes.coverage import (ARCHITECTURES, COLUMNS, KINDS, check_row, inputs_for, load_matrix,
                                       row_for_model, summary_line)
from attnscope.probes.coverage.checks import CAPTURE_CHECKS, Subject
from attnscope.probes.coverage.intervention_checks import check_mode
from attnscope.probes.coverage.outcome import cell_of
from attnscope.probes.coverage.report import DOCS_PATH, render_markdown

MATRIX = load_matrix()
REGENERATE = "regenerate with `python -m attnscope.probes.coverage --write` and review the diff"
CAPTURE_COLUMNS = tuple(CAPTURE_CHECKS)
WORKING = ("gpt2", "llama", "bert", "t5", "vit", "whisper", "gpt_oss")


def test_catalogue_is_broad_and_the_matrix_lists_it():
    assert len(ARCHITECTURES) >= 60
    assert {arch.kind for arch in ARCHITECTURES.values()} == set(KINDS)
    assert list(MATRIX["architectures"]) == list(ARCHITECTURES), REGENERATE
    assert tuple(MATRIX["columns"]) == COLUMNS


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_row_equals_the_shipped_matrix(name):
    row = check_row(name)
    assert row == MATRIX["architectures"][name], f"{name} changed: {row['columns']}; {REGENERATE}"


def test_docs_are_what_the_generator_writes():
    assert DOCS_PATH.read_text(encoding="utf-8") == render_markdown(MATRIX), REGENERATE


@pytest.mark.parametrize("name", WORKING)
def test_families_that_work_pass_every_capture_column(name):
    row = MATRIX["architectures"][name]["columns"]
    assert {c: row[c] for c in CAPTURE_COLUMNS} == {c: "pass" for c in CAPTURE_COLUMNS}


def _subject(name):
    model = ARCHITECTURES[name].builder()
    return Subject(name, model, inputs_for(name, model))


@pytest.mark.parametrize("name", ["llama", "t5", "vit", "dit"])
def test_a_one_percent_disagreement_fails_the_intervention_column(name, monkeypatch):
    """The reference rescales by 1% more than the plan: the column must fail (on the routed, the projection and
    the diffusers edit paths alike), and pass again without the planted error."""
    from attnscope.probes.coverage import intervention_checks

    original = intervention_checks.scale_edit
    monkeypatch.setattr(intervention_checks, "scale_edit", lambda heads, factor: original(heads, factor * 1.01))
    assert cell_of(lambda: check_mode(_subject(name), "rescale")).startswith("fail: outputs differ")
    monkeypatch.undo()
    assert cell_of(lambda: check_mode(_subject(name), "rescale")) == "pass"


def test_a_planted_capture_bug_fails_patterns_and_statistics(monkeypatch):
    from attnscope.probes.recorder import Recorder

    original = Recorder.observe_qk

    def sharper(self, site, query, key, mask, *, scaling, **kwargs):
        return original(self, site, query, key, mask, scaling=scaling * 1.1, **kwargs)

    monkeypatch.setattr(Recorder, "observe_qk", sharper)
    subject = _subject("llama")
    cells = {column: cell_of(lambda c=check: c(subject)) for column, check in CAPTURE_CHECKS.items()}
    assert cells["capture"] == "pass" and cells["outputs"] == "pass"
    assert cells["patterns"].startswith("fail: probabilities differ from the model reference")
    assert cells["statistics"].startswith("fail:") and cells["validate"].startswith("fail:")


def test_info_prints_the_architecture_row(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    assert main(["info", "--model", str(tmp_path / "gpt2")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    cells = MATRIX["architectures"]["gpt2"]["columns"]
    assert last == "coverage (gpt2, text-decoder): " + ", ".join(f"{c} {cells[c].split(':')[0]}" for c in COLUMNS)


def test_lookup_by_model_type_and_a_model_outside_the_matrix():
    cfg = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    classifier = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**cfg))
    assert row_for_model(classifier)[0] == "llama"  # no row for the class: found by config.model_type
    other = transformers.ArceeForCausalLM(transformers.ArceeConfig(**cfg))
    assert row_for_model(other) is None
    assert summary_line(other) == "coverage: not in the coverage matrix (docs/architectures.md)"
