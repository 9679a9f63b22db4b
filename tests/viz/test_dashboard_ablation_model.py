"""The Results tab's ablation panel runs the dashboard's model; on a run captured from another model it refuses
(one line naming both) instead of reporting that model's heads under this run."""

import pytest
import torch
import transformers

import attnscope
from attnscope.dashboards.callbacks import check_same_model
from attnscope.dashboards.files import ResultsRoot
from attnscope.errors import InputError


def test_ablation_refuses_a_run_of_another_model(tmp_path):
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=32, n_positions=16)
    tiny = attnscope.load(transformers.GPT2LMHeadModel(cfg).eval())
    (tmp_path / "run").mkdir()
    attnscope.capture(tiny, torch.tensor([[1, 2, 3, 4]])).save(tmp_path / "run" / "trace.safetensors")
    root = ResultsRoot(tmp_path)
    check_same_model(root, "run/trace.safetensors", tiny)  # the run's own model: fine
    check_same_model(root, None, tiny)  # nothing on screen: fine
    other = attnscope.load("zoo:induction-2l")
    with pytest.raises(InputError, match="another model") as info:
        check_same_model(root, "run/trace.safetensors", other)
    assert "zoo:induction-2l" in str(info.value) and tiny.name in str(info.value)


def test_ablation_runs_the_runs_own_model_when_the_page_offers_it(tmp_path):
    """A run of MiniLM on screen, the dashboard started with another model: the panel loads MiniLM by its name
    (the page offers it) and its numbers equal run_ablation on MiniLM called directly."""
    from attnscope.dashboards.ablation import run_ablation
    from attnscope.dashboards.callbacks import ablation_model
    from attnscope.dashboards.live_state import LiveSession

    organism = attnscope.load("minilm")
    (tmp_path / "run").mkdir()
    attnscope.capture(organism, "a short sentence").save(tmp_path / "run" / "trace.safetensors")
    root = ResultsRoot(tmp_path)
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=32, n_positions=16)
    startup = attnscope.load(transformers.GPT2LMHeadModel(cfg).eval())
    offered = LiveSession(startup)
    handle = ablation_model(root, "run/trace.safetensors", startup, offered)
    assert handle.name == "minilm" and handle is offered.model("minilm")
    assert ablation_model(root, None, startup, offered) is startup  # nothing on screen: the start-up model
    text = "The cat sat on the mat."
    got = run_ablation(handle, "L2H*", "zero", text)
    want = run_ablation(organism, "L2H*", "zero", text)
    assert (got["metric_before"], got["metric_after"]) == (want["metric_before"], want["metric_after"])
    assert got["metric_after"] != got["metric_before"]
    # a run of a model the page does not offer (a user's own model object): refused, nothing loaded
    (tmp_path / "own").mkdir()
    attnscope.capture(startup, torch.tensor([[1, 2, 3]])).save(tmp_path / "own" / "trace.safetensors")
    with pytest.raises(InputError, match="another model|does not offer"):
        ablation_model(root, "own/trace.safetensors", organism, LiveSession())
    with pytest.raises(InputError, match="no model to ablate"):
        ablation_model(root, None, None, LiveSession())
