"""The multimodal CLI: ``attnscope heatmap`` on a real (tiny, random-init) diffusers pipeline saved to disk."""

import pytest
import torch

import attnscope
from attnscope.cli import main


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    from attnscope.probes.adapters.diffusers_pipeline import tiny_sd_pipeline

    path = tmp_path_factory.mktemp("pipe") / "tiny-sd"
    tiny_sd_pipeline().save_pretrained(str(path))
    return path


def test_heatmap_writes_the_maps_of_the_library_call(pipe_dir, tmp_path, capsys):
    from attnscope.circuits.daam import daam_maps

    out = tmp_path / "maps.parquet"
    rc = main(["heatmap", "--model", str(pipe_dir), "--prompt", "a red cat", "--word", "red,cat", "--out", str(out),
               "--steps", "2", "--seed", "3", "--size", "grid"])
    assert rc == 0 and "peak at" in capsys.readouterr().out
    table = attnscope.ResultTable.load(out).df
    expected = daam_maps(attnscope.load(str(pipe_dir)), ["a red cat"], ["red", "cat"], seed=3, num_inference_steps=2)
    for j, word in enumerate(["red", "cat"]):
        rows = table[table["word"] == word].sort_values(["y", "x"])
        got = torch.tensor(rows["value"].to_numpy(), dtype=torch.float32).reshape(expected.maps.shape[-2:])
        torch.testing.assert_close(got, expected.maps[0, j], atol=1e-6, rtol=1e-5)


def test_heatmap_png_has_one_panel_per_word_plus_the_image(pipe_dir, tmp_path):
    from PIL import Image

    out = tmp_path / "fig.png"
    assert main(["heatmap", "--model", str(pipe_dir), "--prompt", "a red cat", "--word", "red", "--word", "cat",
                 "--out", str(out), "--steps", "2"]) == 0
    width, height = Image.open(out).size
    assert (width, height) == (3 * 256 + 2 * 6, 256 + 22)  # image + 2 words, square panels 256 px high, labels


@pytest.mark.parametrize("extra,needle", [
    (["--word", "dog", "--out", "x.png"], "word not found"),
    (["--word", "red", "--out", "x.jpg"], "unknown output format"),
    (["--word", "red", "--out", "x.png", "--heads", "0,a"], "malformed list of heads"),
])
def test_heatmap_bad_input_is_one_line_exit_2(pipe_dir, tmp_path, extra, needle, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["heatmap", "--model", str(pipe_dir), "--prompt", "a red cat", "--steps", "1", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err
    assert not list(tmp_path.glob("x.*"))


def test_heatmap_missing_model_is_one_line_exit_2(tmp_path, capsys):
    assert main(["heatmap", "--model", str(tmp_path / "none"), "--prompt", "a", "--word", "a",
                 "--out", str(tmp_path / "f.png")]) == 2
    assert "model path does not exist" in capsys.readouterr().err


def test_score_visual_heads_on_the_shapes_vlm_matches_the_library(tmp_path, capsys):
    from attnscope.circuits.visual_head_scores import visual_heads
    from attnscope.datasets.shapes_vlm_suite import shapes_vlm_examples

    out = tmp_path / "vh.parquet"
    assert main(["score", "visual-heads", "--model", "zoo:shapes-vlm", "--suite", "shapes", "--n-items", "6",
                 "--seed", "2", "--out", str(out)]) == 0
    assert "visual_mass" in capsys.readouterr().out
    got = attnscope.ResultTable.load(out).df
    model = attnscope.load("zoo:shapes-vlm")
    want = visual_heads(model, shapes_vlm_examples(model, 6, seed=2)).df
    key = ["layer", "head", "metric"]
    merged = got.merge(want, on=key, suffixes=("_cli", "_lib"))
    assert len(merged) == len(want) > 0
    assert (merged["value_cli"] - merged["value_lib"]).abs().max() < 1e-6


def test_score_hrv_with_named_concepts(pipe_dir, tmp_path, capsys):
    out = tmp_path / "hrv.parquet"
    assert main(["score", "hrv", "--model", str(pipe_dir), "--suite", "shapes", "--n-items", "2", "--steps", "1",
                 "--concepts", "colour=red|blue|green|yellow;shape=circle|square|triangle", "--out", str(out)]) == 0
    df = attnscope.ResultTable.load(out).df
    counts = df[df["metric"] == "count"]
    assert set(df["concept"]) == {"colour", "shape"}
    # each head votes once per (prompt, step): 2 prompts x 1 step, over the two concepts
    assert (counts.groupby(["site", "head"])["value"].sum() == 2).all()


@pytest.mark.parametrize("args,needle", [
    (["score", "hrv", "--model", "zoo:shapes-vlm", "--suite", "shapes", "--out", "x.parquet"], "pipeline"),
    (["score", "visual-heads", "--model", "zoo:induction-2l", "--suite", "shapes", "--out", "x.parquet"],
     "needs a VLM or a diffusion pipeline"),
    (["score", "hrv", "--model", "zoo:shapes-vlm", "--suite", "shapes", "--concepts", "a=", "--out", "x.parquet"],
     "malformed --concepts"),
])
def test_score_multimodal_bad_input_is_one_line_exit_2(args, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err
