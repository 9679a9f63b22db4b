"""Shared pieces of the bad-input battery (``test_bad_inputs_cli.py``, ``test_bad_inputs_api.py``): a folder of
malformed input files, and snapshots that prove a failed command left nothing behind."""

import json
import os
from pathlib import Path

import numpy as np

NON_UTF8 = b"\xff\xfe\xfa not utf-8 \x80\x81"


def _deep_json(depth: int = 100_000) -> str:
    return "[" * depth + "]" * depth


def make_inputs(root: Path) -> Path:
    """Every malformed file the battery feeds to the CLI and the API, in ``root`` (returned)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "adir").mkdir()
    (root / "afile").write_text("a plain file\n")
    for name in ("bad.json", "bad.yaml", "bad.npy", "bad_plan.json"):
        (root / name).write_bytes(NON_UTF8)
    (root / "deep.json").write_text(_deep_json())
    (root / "deep.yaml").write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    (root / "notjson.json").write_text("{this is not json")
    (root / "list.json").write_text("[]")
    suite = {"format": "attnscope.prompt_suite/1", "name": "s", "items": [{"ids": [1, 2, 3]}]}
    (root / "noname.json").write_text(json.dumps({k: v for k, v in suite.items() if k != "name"}))
    (root / "noitems.json").write_text(json.dumps({k: v for k, v in suite.items() if k != "items"}))
    (root / "itemsdict.json").write_text(json.dumps(dict(suite, items={"a": 1})))
    (root / "unknownfield.json").write_text(json.dumps(dict(suite, items=[{"ids": [1, 2], "colour": "red"}])))
    (root / "noidsnotext.json").write_text(json.dumps(dict(suite, items=[{"label": 1}])))
    (root / "badids.json").write_text(json.dumps(dict(suite, items=[{"ids": ["a", "b"]}])))
    (root / "outofvocab.json").write_text(json.dumps(dict(suite, items=[{"ids": [1, 2, 10**6]}])))
    (root / "wrongformat.json").write_text(json.dumps(dict(suite, format="something/1")))
    np.save(root / "object.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(root / "cube.npy", np.zeros((2, 2, 2)))
    np.save(root / "rect.npy", np.zeros((3, 5)))
    np.save(root / "strings.npy", np.array(["a", "b"]))
    np.save(root / "nan.npy", np.full((4, 4), np.nan))
    (root / "plan_list.json").write_text("[]")
    (root / "plan_format.json").write_text(json.dumps({"format": "nope", "mode": "zero"}))
    (root / "plan_nomode.json").write_text(json.dumps({"format": "attnscope.intervention/1", "heads": "L0H0"}))
    (root / "spec_list.yaml").write_text("- a\n- b\n")
    (root / "spec_invalid.yaml").write_text("models: [minilm\n")
    base = {"models": ["minilm"], "suites": [{"generator": "induction", "n_items": 2, "seq_len": 8,
                                              "vocab_size": 32}], "analyses": ["head-stats"]}
    for name, spec in {"spec_ok": base, "spec_dotdot": dict(base, name="../../x"), "spec_slash": dict(base, name="a/b"),
                       "spec_hidden": dict(base, name=".hidden"), "spec_unknown_key": dict(base, colour="red"),
                       "spec_no_models": dict(base, models=[]), "spec_bad_analysis": dict(base, analyses=["nope"]),
                       "spec_bad_generator": dict(base, suites=[{"generator": "nope"}]),
                       "spec_bad_seed": dict(base, seed="x"), "spec_bad_retries": dict(base, max_retries=-1),
                       "spec_bad_memory": dict(base, resources={"memory": "lots"}),
                       "spec_bad_heads": dict(base, interventions=[{"heads": "LxH1", "mode": "zero"}]),
                       "spec_bad_mode": dict(base, interventions=[{"heads": "L0H1", "mode": "explode"}]),
                       "spec_bad_import": dict(base, imports=["no_such_module_xyz"])}.items():
        (root / f"{name}.yaml").write_text(json.dumps(spec))  # JSON is YAML
    for name, text in {"prune_badjson": "{not json", "prune_list": "[]", "prune_nosteps": '{"run": {}, "pruning": {}}',
                       "prune_other": json.dumps({"run": {"model": "other"}, "pruning": {"steps": []}})}.items():
        (root / name).mkdir()
        (root / name / "state.json").write_text(text)
    (root / "prune_nonutf8").mkdir()
    (root / "prune_nonutf8" / "state.json").write_bytes(NON_UTF8)
    (root / "model_noconfig").mkdir()
    (root / "model_badtype").mkdir()
    (root / "model_badtype" / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    (root / "model_badjson").mkdir()
    (root / "model_badjson" / "config.json").write_text("{not json")
    (root / "model_nonutf8").mkdir()
    (root / "model_nonutf8" / "config.json").write_bytes(NON_UTF8)
    (root / "sweep_nocells").mkdir()
    (root / "sweep_nocells" / "_sweep.json").write_text(json.dumps({"format": "attnscope.sweep/1"}))
    (root / "sweep_nonutf8").mkdir()
    (root / "sweep_nonutf8" / "_sweep.json").write_bytes(NON_UTF8)
    (root / "sweep_badjson").mkdir()
    (root / "sweep_badjson" / "_sweep.json").write_text("{nope")
    (root / "sweep_empty").mkdir()
    (root / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}garbage")
    (root / "garbage.parquet").write_bytes(b"PAR1 not really")
    return root


def snapshot(*folders: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``folders`` with its size and modification time."""
    seen: dict[str, tuple[int, int]] = {}
    for folder in folders:
        for here, dirs, files in os.walk(folder):
            for name in dirs + files:
                path = Path(here, name)
                stat = path.lstat()
                # a folder counts by its presence (creating and removing a probe file changes its mtime)
                seen[str(path)] = (stat.st_size, stat.st_mtime_ns) if name in files else (-1, 0)
    return seen


def left_behind(before: dict, after: dict) -> list[str]:
    """Paths created, changed or removed between two snapshots."""
    return sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
