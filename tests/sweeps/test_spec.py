"""Sweep spec validation (no Ray): clear errors that say where, stable cell ids, the grid."""

import pytest
import yaml

from attnscope.errors import InputError
from attnscope.sweeps.spec import load_spec, parse_memory, parse_spec

BASE = {"models": ["minilm"], "suites": [{"generator": "induction", "n_items": 2, "seq_len": 16, "vocab_size": 64}],
        "analyses": ["head-stats"]}


def spec(**changes):
    return parse_spec({**BASE, **changes})


def test_grid_ids_are_stable_and_ignore_labels_and_resources():
    s = spec(models=["minilm", {"model": "minilm", "attn_implementation": "eager", "label": "eager"}],
             interventions=["none", {"heads": "L0H1", "mode": "zero"}, {"heads": "L1H*", "mode": "rescale",
                                                                         "scale": 0.5}])
    cells = s.cells()
    assert len(cells) == 2 * 3 and len({c.id for c in cells}) == 6
    assert [c.id for c in cells] == [c.id for c in spec(**{k: v for k, v in s.raw.items() if k in BASE or
                                                          k == "interventions"}).cells()]
    relabelled = spec(models=[{"model": "minilm", "label": "m", "resources": {"num_cpus": 2, "memory": "1GiB"}},
                              {"model": "minilm", "attn_implementation": "eager", "label": "eager"}],
                      interventions=s.raw["interventions"])
    assert [c.id for c in relabelled.cells()] == [c.id for c in cells]
    assert relabelled.models[0].resources.memory == 2**30 and relabelled.models[0].resources.num_cpus == 2
    assert spec(seed=1).cells()[0].id != spec().cells()[0].id  # the seed decides results


@pytest.mark.parametrize("changes, where", [
    ({"models": []}, "models"),
    ({"models": [{"label": "x"}]}, "models[0]"),
    ({"models": ["./no/such/dir"]}, "models[0].model"),
    ({"models": [{"model": "minilm", "device_map": "everywhere"}]}, "models[0].device_map"),
    ({"models": [{"model": "minilm", "device_map": {"encoder": "disk"}}]}, "models[0].offload_folder"),
    ({"suites": [{"generator": "nope"}]}, "suites[0].generator"),
    ({"suites": [{"generator": "induction", "n_itemz": 3}]}, "suites[0]"),
    ({"analyses": ["no-such-analysis"]}, "analyses[0].name"),
    ({"interventions": [{"heads": "L0H1", "mode": "explode"}]}, "interventions[0].mode"),
    ({"interventions": [{"heads": "X3", "mode": "zero"}]}, "interventions[0].heads"),
    ({"interventions": [{"heads": "L0H1", "mode": "rescale"}]}, "interventions[0].scale"),
    ({"resources": {"num_gpus": -1}}, "resources.num_gpus"),
    ({"resources": {"memory": "lots"}}, "resources.memory"),
    ({"modelz": ["minilm"]}, "top level"),
    ({"analyses": ["prev-token"], "remote": True}, "analyses[0]"),
    ({"imports": ["no_such_plugin_module"]}, "imports"),
])
def test_bad_specs_say_where(changes, where):
    with pytest.raises(InputError) as info:
        spec(**changes)
    assert str(info.value).startswith(f"sweep spec: {where}:"), str(info.value)


def test_yaml_file_and_relative_paths(tmp_path):
    from tiny_models import tiny_text_model

    tiny_text_model("gpt2").save_pretrained(tmp_path / "gpt2")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({**BASE, "models": ["./gpt2"], "name": "t"}))
    s = load_spec(tmp_path / "s.yaml")
    assert s.models[0].source == str((tmp_path / "gpt2").resolve()) and s.name == "t"
    (tmp_path / "bad.yaml").write_text("models: [unclosed")
    with pytest.raises(InputError, match="not valid YAML"):
        load_spec(tmp_path / "bad.yaml")


def test_memory_units():
    assert parse_memory("2GB") == 2 * 10**9 and parse_memory("512MiB") == 512 * 2**20 and parse_memory(1024) == 1024


def test_unreachable_cluster_address_fails_fast(tmp_path):
    import time

    import ray

    ray.shutdown()  # a Ray instance left by another test in this worker would hide the failure

    from attnscope.sweeps import run_sweep

    start = time.perf_counter()
    with pytest.raises(InputError, match="cannot join the Ray cluster"):
        run_sweep(BASE, tmp_path, address="127.0.0.1:1", progress=False)
    assert time.perf_counter() - start < 15 and not ray.is_initialized()
