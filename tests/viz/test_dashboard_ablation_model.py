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
