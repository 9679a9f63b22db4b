"""The sweep spec: a YAML grid of models x suites x analyses x interventions, validated into cells.

Every problem is an ``InputError`` naming where it is (``sweep spec: models[1].device_map: ...``), what was
expected, what was found, and the fix. A cell's id is a stable hash of what decides its result (model source and
loading options, suite, analysis and options, intervention, seed, remote mode); labels and resource requests are
not part of it, so relabelling or resizing a sweep reuses the cells already on disk.

Example:
    >>> from attnscope.sweeps.spec import parse_spec
    >>> spec = parse_spec({"models": ["minilm"], "suites": [{"generator": "induction", "n_items": 2}],
    ...                    "analyses": ["prev-token"], "interventions": ["none", {"heads": "L0H1", "mode": "zero"}]})
    >>> [c.intervention.label for c in spec.cells()]
    ['none', 'zero:L0H1']
    >>> len({c.id for c in spec.cells()})
    2
"""

import hashlib
import inspect
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .._atomic import read_text
from .._extras import require
from ..circuits.registry import get_analysis
from ..errors import InputError
from .entries import (AnalysisEntry, InterventionEntry, ModelEntry, Resources, SuiteEntry, _check_keys, _err,
                      parse_memory)

SPEC_FORMAT = "attnscope.sweep/1"
_TOP_KEYS = {"name", "seed", "models", "suites", "analyses", "interventions", "resources", "max_retries", "imports",
             "remote", "format"}


@dataclass(frozen=True)
class Cell:
    """One task of the sweep: a model, a suite, an analysis, an intervention, a seed."""

    id: str
    model: ModelEntry
    suite: SuiteEntry
    analysis: AnalysisEntry
    intervention: InterventionEntry
    seed: int
    remote: "bool | str" = False

    def identity(self) -> dict[str, Any]:
        return {"model": self.model.identity(), "suite": self.suite.identity(),
                "analysis": self.analysis.identity(), "intervention": self.intervention.identity(),
                "seed": self.seed, "remote": self.remote}

    def labels(self) -> dict[str, str]:
        return {"model": self.model.label, "suite": self.suite.label, "analysis": self.analysis.label,
                "intervention": self.intervention.label}

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "labels": self.labels(), "identity": self.identity(),
                "model": asdict(self.model), "suite": asdict(self.suite), "analysis": asdict(self.analysis),
                "intervention": asdict(self.intervention), "seed": self.seed, "remote": self.remote}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Cell":
        model = dict(data["model"])
        model["resources"] = Resources(**model["resources"])
        return cls(data["id"], ModelEntry(**model), SuiteEntry(**data["suite"]), AnalysisEntry(**data["analysis"]),
                   InterventionEntry(**data["intervention"]), int(data["seed"]), data.get("remote", False))


def cell_id(identity: dict[str, Any]) -> str:
    blob = json.dumps({"format": SPEC_FORMAT, **identity}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class SweepSpec:
    """A validated sweep: the entries of each axis, the defaults, and the raw mapping it came from."""

    name: str
    seed: int
    models: list[ModelEntry]
    suites: list[SuiteEntry]
    analyses: list[AnalysisEntry]
    interventions: list[InterventionEntry]
    resources: Resources
    max_retries: int
    imports: list[str]
    remote: "bool | str"
    raw: dict[str, Any]

    def cells(self) -> list[Cell]:
        out, seen = [], set()
        for model in self.models:
            for suite in self.suites:
                for analysis in self.analyses:
                    for intervention in self.interventions:
                        probe = Cell("", model, suite, analysis, intervention, self.seed, self.remote)
                        cid = cell_id(probe.identity())
                        if cid not in seen:
                            seen.add(cid)
                            out.append(Cell(cid, model, suite, analysis, intervention, self.seed, self.remote))
        return out

    def with_remote(self, remote: "bool | str") -> "SweepSpec":
        _check_remote(self.analyses, remote)
        return SweepSpec(**{**self.__dict__, "remote": remote})


def _entries(data: dict, key: str, default: list | None = None) -> list:
    value = data.get(key, default)
    if value is None:
        raise _err(key, "missing", f"a list of {key}", None)
    if not isinstance(value, list) or not value:
        raise _err(key, "must be a non-empty list", f"- entries of {key}", value)
    return value


def _check_remote(analyses: list[AnalysisEntry], remote: "bool | str") -> None:
    if remote not in (False, True, "local"):
        raise _err("remote", "bad remote mode", "false, true or local", repr(remote))
    if remote:
        for i, entry in enumerate(analyses):
            if "remote" not in inspect.signature(get_analysis(entry.name).fn).parameters:
                raise _err(f"analyses[{i}]", f"{entry.name!r} cannot run on a remote backend",
                           "an analysis that captures through attnscope (e.g. head-stats)", entry.name,
                           fix="run it locally, or drop --remote")


def load_imports(imports: list[str], base_dir: Path | None = None) -> None:
    """Import the modules (names or ``.py`` files) that register extra analyses."""
    import importlib
    import importlib.util
    import sys

    for entry in imports:
        if entry.endswith(".py"):
            path = Path(entry).expanduser()
            path = path if path.is_absolute() or base_dir is None else base_dir / path
            name = "attnscope_sweep_plugin_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
            if name in sys.modules:
                continue
            if not path.is_file():
                raise _err("imports", "plugin file not found", "an existing .py file", str(path))
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        else:
            try:
                importlib.import_module(entry)
            except ImportError as exc:
                raise _err("imports", "cannot import plugin module", "an importable module or a .py path", entry,
                           fix=str(exc)) from None


def _name(value: Any) -> str:
    """The sweep's name: also its default folder ``results/sweeps/<name>``, so one plain path component."""
    name = "sweep" if value is None or value == "" else value
    if not isinstance(name, (str, int)) or isinstance(name, bool):
        raise _err("name", "name must be a string", "e.g. sinks-vs-ablation", repr(name))
    name = str(name)
    if any(c in name for c in "/\\\x00:") or name.strip() in (".", "..") or name.startswith(".") or \
            name != name.strip() or len(name) > 200:
        raise _err("name", "name must be one plain folder name", "letters, digits, '-', '_', '.', not starting "
                   "with '.', no path separators", repr(name)[:100], fix="e.g. name: sinks-vs-ablation (pass --out to "
                   "choose the folder)")
    return name


def parse_spec(data: Any, base_dir: "str | Path | None" = None) -> SweepSpec:
    """Validate a spec mapping (YAML already parsed). Relative paths are relative to ``base_dir`` (default cwd)."""
    base = Path(base_dir or ".").resolve()
    if not isinstance(data, dict):
        raise _err("top level", "a sweep spec is a mapping", "models:, suites:, analyses:", type(data).__name__)
    _check_keys(data, _TOP_KEYS, "top level")
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise _err("seed", "seed must be an integer", "an int", repr(seed))
    retries = data.get("max_retries", 2)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise _err("max_retries", "not a non-negative integer", ">= 0", repr(retries))
    imports = data.get("imports") or []
    if not isinstance(imports, list) or not all(isinstance(i, str) for i in imports):
        raise _err("imports", "imports must be a list of module names or .py paths", "[mypkg.analyses]", imports)
    imports = [str((base / i).resolve()) if i.endswith(".py") and not Path(i).is_absolute() else i for i in imports]
    load_imports(imports)
    resources = Resources.parse(data.get("resources"), "resources")
    models = [ModelEntry.parse(m, f"models[{i}]", base, resources) for i, m in enumerate(_entries(data, "models"))]
    suites = [SuiteEntry.parse(s, f"suites[{i}]", base, seed) for i, s in enumerate(_entries(data, "suites"))]
    analyses = [AnalysisEntry.parse(a, f"analyses[{i}]") for i, a in enumerate(_entries(data, "analyses"))]
    interventions = [InterventionEntry.parse(x, f"interventions[{i}]")
                     for i, x in enumerate(_entries(data, "interventions", ["none"]))]
    remote = data.get("remote", False)
    _check_remote(analyses, remote)
    for axis, entries in (("models", models), ("suites", suites), ("analyses", analyses),
                          ("interventions", interventions)):
        labels = [e.label for e in entries]
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise _err(axis, "labels must be unique", "distinct labels (add `label:`)", dupes)
    name = _name(data.get("name"))
    return SweepSpec(name, seed, models, suites, analyses, interventions, resources, retries, imports, remote,
                     dict(data))


def with_placement(data: Any, device_map: "str | None" = None, max_memory: "str | None" = None) -> Any:
    """``data`` (a spec mapping) with ``device_map`` / ``max_memory`` added to every model entry that names none
    (``attnscope sweep --device-map``); anything ``parse_spec`` would refuse is left for it to refuse."""
    if not (device_map or max_memory) or not isinstance(data, dict) or not isinstance(data.get("models"), list):
        return data
    models = []
    for entry in data["models"]:
        if isinstance(entry, (str, dict)):
            entry = {"model": entry} if isinstance(entry, str) else dict(entry)
            if device_map and "device_map" not in entry:
                entry["device_map"] = device_map
            if max_memory and "max_memory" not in entry:
                entry["max_memory"] = max_memory
        models.append(entry)
    return {**data, "models": models}


def load_spec(path: "str | Path", *, device_map: "str | None" = None, max_memory: "str | None" = None) -> SweepSpec:
    """Read and validate a YAML (or JSON) spec file; ``device_map`` / ``max_memory``: the placement of every model
    that names none (``with_placement``)."""
    yaml = require("yaml", "sweeps")

    path = Path(path).expanduser()
    text = read_text(path, "sweep spec", "a YAML file (UTF-8)")
    try:
        data = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as exc:
        raise InputError("sweep spec is not valid YAML", expected="a YAML mapping",
                         got=str(exc).replace("\n", " ")[:240]) from None
    return parse_spec(with_placement(data, device_map, max_memory), base_dir=path.parent)


__all__ = ["AnalysisEntry", "Cell", "InterventionEntry", "ModelEntry", "Resources", "SPEC_FORMAT", "SuiteEntry",
           "SweepSpec", "cell_id", "load_imports", "load_spec", "parse_memory", "parse_spec", "with_placement"]
