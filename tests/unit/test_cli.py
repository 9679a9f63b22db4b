"""The CLI: one-line errors with exit code 2 on bad input; real captures written to disk."""

import subprocess
import sys

import pytest

import attnscope
from attnscope.cli import main


def test_capture_writes_a_loadable_trace(tmp_path, capsys):
    out = tmp_path / "t.safetensors"
    rc = main(["capture", "--model", "minilm", "--text", "hello world", "--heads", "L1H*", "--rows", "last:2",
               "--stats", "sink,entropy,topk", "--out", str(out)])
    assert rc == 0
    trace = attnscope.AttentionTrace.load(out)
    rec = trace[attnscope.Site("text", 1)]
    assert rec.probs is None and rec.stats["mass"].shape == (1, 12, 2, 1) and rec.mass_spans == [(0, 1)]
    assert [str(s) for s in trace.sites] == ["text.L1.self"]


@pytest.mark.parametrize("args,needle", [
    (["info", "--model", "/no/such/dir"], "model path does not exist"),
    (["info", "--model", "zoo:no-such-organism"], "no-such-organism"),
    (["capture", "--model", "minilm", "--text", "hi", "--heads", "L1Q2", "--out", "x"], "malformed head spec"),
    (["capture", "--model", "minilm", "--text", "hi", "--heads", "L6H0", "--out", "x"], "layer < 6"),
    (["capture", "--model", "minilm", "--text", "hi", "--stats", "bogus", "--out", "x"], "unknown statistic"),
    (["capture", "--model", "minilm", "--text", "word " * 600, "--out", "x"], "<= 512 tokens"),
])
def test_bad_input_prints_one_line_and_exits_2(args, needle, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and err.startswith("attnscope: error:")


def test_capture_takes_token_ids_for_a_model_without_tokenizer(tmp_path, capsys):
    import torch

    from tiny_models import tiny_text_model

    model = tiny_text_model("llama")
    model.save_pretrained(tmp_path / "m")
    out = tmp_path / "t.safetensors"
    assert main(["capture", "--model", str(tmp_path / "m"), "--ids", "5,17,3,9", "--ids", "6,2,9,1",
                 "--stats", "entropy", "--out", str(out)]) == 0
    saved = attnscope.AttentionTrace.load(out).stat("entropy")
    direct = attnscope.capture(model, torch.tensor([[5, 17, 3, 9], [6, 2, 9, 1]]), stats=("entropy",)).stat("entropy")
    torch.testing.assert_close(saved, direct)
    assert main(["capture", "--model", str(tmp_path / "m"), "--text", "hi", "--out", str(out)]) == 2
    assert "--ids" in capsys.readouterr().err
    assert main(["capture", "--model", str(tmp_path / "m"), "--ids", "5,17", "--ids", "6", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "equally long" in err


def test_unsupported_family_exits_2(tmp_path, capsys):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    assert main(["info", "--model", str(tmp_path)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_console_script_runs_models():
    result = subprocess.run([sys.executable, "-m", "attnscope.cli", "models"], capture_output=True, text=True)
    assert result.returncode == 0 and "minilm" in result.stdout


@pytest.mark.parametrize("method", ["rollout", "flow", "relevance", "attention"])
def test_attribute_writes_a_result_table(tmp_path, method, capsys):
    out = tmp_path / "a.parquet"
    assert main(["attribute", "--model", "minilm", "--text", "Paris is in France.", "--method", method,
                 "--layer", "-1", "--out", str(out)]) == 0
    table = attnscope.ResultTable.load(out)
    assert list(table.df["token"])[:2] == ["[CLS]", "paris"] and len(table.df) == 7
    assert table.df["metric"].iloc[0] == method
    if method in ("rollout", "flow", "attention"):
        assert abs(table.df["value"].sum() - 1.0) < 1e-5  # one row of a row-stochastic matrix


def test_attribute_bad_layer_exits_2(tmp_path, capsys):
    assert main(["attribute", "--model", "minilm", "--text", "hi", "--method", "rollout", "--layer", "9",
                 "--out", str(tmp_path / "a.parquet")]) == 2
    assert "layer out of range" in capsys.readouterr().err
