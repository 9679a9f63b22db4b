"""attnscope.load on local directories (the real from_pretrained paths), model objects, and bad paths."""

import json

import pytest
import torch
from tiny_models import tiny_text_model

import attnscope
from attnscope.probes import validate


def test_local_hf_directory_loads_through_from_pretrained(tmp_path):
    tiny_text_model("llama").save_pretrained(tmp_path / "llama")
    model = attnscope.load(tmp_path / "llama")
    assert type(model.module).__name__ == "LlamaForCausalLM" and model.info().tower().n_kv_heads == 2
    assert validate(model).ok
    eager = attnscope.load(tmp_path / "llama", attn_implementation="eager")
    assert eager.info().attn_implementation == "eager"


def test_local_diffusers_model_directory(tmp_path):
    from attnscope.probes.adapters.diffusers_unet import tiny_unet

    tiny_unet().save_pretrained(tmp_path / "unet")
    model = attnscope.load(tmp_path / "unet")
    assert type(model.module).__name__ == "UNet2DConditionModel"
    assert validate(model).ok


def test_local_diffusers_pipeline_directory(tmp_path):
    from attnscope.probes.adapters.diffusers_pipeline import tiny_sd_pipeline

    tiny_sd_pipeline().save_pretrained(tmp_path / "pipe")
    model = attnscope.load(tmp_path / "pipe")
    assert type(model.module).__name__ == "StableDiffusionPipeline"
    assert any(s.kind == "cross" for s in model.info().sites)


def test_model_objects_are_wrapped():
    module = tiny_text_model("bert")
    model = attnscope.load(module)
    assert model.module is module and model.family == "hf-text"


@pytest.mark.parametrize("make", ["missing", "file", "empty_dir", "bad_json"])
def test_bad_paths_raise_named_errors(tmp_path, make):
    path = tmp_path / "m"
    if make == "file":
        path.write_text("x")
    elif make == "empty_dir":
        path.mkdir()
    elif make == "bad_json":
        path.mkdir()
        (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": "not a number"}))
    with pytest.raises((attnscope.ModelNotFoundError, attnscope.UnsupportedModelError)):
        attnscope.load(path)


def test_zoo_name_without_organism_is_refused():
    with pytest.raises(attnscope.ModelNotFoundError):
        attnscope.load("zoo:does-not-exist")


def test_hub_name_offline_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(attnscope.ModelNotFoundError, match="cannot load 'someorg/some-model' from the model hub"):
        attnscope.load("someorg/some-model")
    assert torch.__version__.endswith("+cpu")
