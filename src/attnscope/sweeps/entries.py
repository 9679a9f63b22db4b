"""The entries of a sweep spec: resources, models, suites, analyses and interventions, each validated from YAML
data with an ``InputError`` naming where the problem is (``sweep spec: models[1].device_map: ...``).

Example:
    >>> from attnscope.sweeps.entries import parse_memory
    >>> parse_memory("2GiB")
    2147483648
"""

import hashlib
import inspect
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..circuits.registry import get_analysis
from ..errors import AttnscopeError, InputError
from ..probes.device_map import parse_device_map, parse_max_memory
from ..probes.heads import HeadSet
from ..probes.interventions import MODES
from ..tasks.generated_suites import GENERATORS, generator
from ..tasks.references import SuiteRef
from ..tasks.suites import INPUT_SUITES, check_suite_params

_MODEL_KEYS = {"model", "label", "attn_implementation", "device_map", "max_memory", "offload_folder", "dtype",
               "resources"}
_SUITE_KEYS = {"generator", "path", "label", "params", "seed"}
_ANALYSIS_KEYS = {"name", "label", "options"}
_INTERVENTION_KEYS = {"heads", "mode", "label", "scale", "select", "per_position", "seed", "mean_values"}
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def _err(where: str, what: str, expected: Any, got: Any, fix: str | None = None) -> InputError:
    return InputError(f"sweep spec: {where}: {what}", expected=expected, got=got, fix=fix)


def parse_memory(value: Any, where: str = "resources.memory") -> int | None:
    """Bytes from ``2GB``, ``512MiB``, ``1.5G`` or an integer."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise _err(where, "bad memory amount", "a size like 2GB, 512MiB or bytes", repr(value))
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


@dataclass(frozen=True)
class Resources:
    """What one cell asks Ray for: CPUs, GPUs (fractions allowed) and memory in bytes."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory: int | None = None

    @classmethod
    def parse(cls, data: Any, where: str, base: "Resources | None" = None) -> "Resources":
        base = base or cls()
        if data is None:
            return base
        if not isinstance(data, dict):
            raise _err(where, "resources must be a mapping", "{num_cpus: 1, num_gpus: 0, memory: 2GB}", data)
        unknown = set(data) - {"num_cpus", "num_gpus", "memory"}
        if unknown:
            raise _err(where, "unknown resource", "num_cpus, num_gpus, memory", sorted(unknown))
        out = {}
        for key in ("num_cpus", "num_gpus"):
            value = data.get(key, getattr(base, key))
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise _err(f"{where}.{key}", "not a non-negative number", ">= 0", repr(value))
            out[key] = float(value)
        memory = parse_memory(data["memory"], f"{where}.memory") if "memory" in data else base.memory
        return cls(out["num_cpus"], out["num_gpus"], memory)

    def ray_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory:
            options["memory"] = self.memory
        return options


def _check_keys(data: dict, allowed: set[str], where: str) -> None:
    unknown = set(data) - allowed
    if unknown:
        raise _err(where, "unknown key", sorted(allowed), sorted(unknown), fix="check the spelling")


def _label(value: Any, default: str, where: str) -> str:
    if value is None:
        return default
    if not isinstance(value, str) or not value.strip():
        raise _err(f"{where}.label", "label must be a non-empty string", "a string", repr(value))
    return value


@dataclass(frozen=True)
class ModelEntry:
    label: str
    source: str
    load: dict[str, Any] = field(default_factory=dict)  # attn_implementation, device_map, max_memory, ...
    resources: Resources = Resources()

    def identity(self) -> dict[str, Any]:
        return {"source": self.source, **{k: self.load[k] for k in sorted(self.load)}}

    def load_options(self) -> dict[str, Any]:
        """``load`` as ``from_pretrained`` takes it (the spec keeps JSON: device keys and dtype as strings)."""
        import torch  # the spec is parsed without torch (`attnscope sweep --help` stays quick)

        options = dict(self.load)
        if "max_memory" in options:
            options["max_memory"] = parse_max_memory(options["max_memory"])
        if "dtype" in options:
            options["dtype"] = getattr(torch, options["dtype"].removeprefix("torch."))
        return options

    @classmethod
    def parse(cls, data: Any, where: str, base_dir: Path, resources: Resources) -> "ModelEntry":
        if isinstance(data, str):
            data = {"model": data}
        if not isinstance(data, dict) or not isinstance(data.get("model"), str):
            raise _err(where, "a model entry needs `model`", "a name/path string or {model: NAME, ...}", data)
        _check_keys(data, _MODEL_KEYS, where)
        source = data["model"]
        local = Path(source).expanduser()
        if source.startswith((".", "/", "~")):
            local = local if local.is_absolute() else (base_dir / local)
            if not local.exists():
                raise _err(f"{where}.model", "model path does not exist", "an existing directory", str(local),
                           fix="fix the path (relative paths are relative to the spec file)")
            source = str(local.resolve())
        load: dict[str, Any] = {}
        if data.get("attn_implementation") is not None:
            load["attn_implementation"] = str(data["attn_implementation"])
        try:
            if data.get("device_map") is not None:
                load["device_map"] = parse_device_map(data["device_map"])
            if data.get("max_memory") is not None:
                load["max_memory"] = {str(k): v for k, v in parse_max_memory(data["max_memory"]).items()}
        except AttnscopeError as exc:
            raise _err(f"{where}.device_map", str(exc), exc.expected, exc.got, exc.fix) from None
        for key in ("offload_folder", "dtype"):
            if data.get(key) is not None:
                load[key] = str(data[key])
        if isinstance(load.get("device_map"), dict) and "disk" in load["device_map"].values() \
                and "offload_folder" not in load:
            raise _err(f"{where}.offload_folder", "a device map with 'disk' needs an offload folder",
                       "offload_folder: DIR", None)
        label = _label(data.get("label"), data["model"], where)
        return cls(label, source, load, Resources.parse(data.get("resources"), f"{where}.resources", resources))


@dataclass(frozen=True)
class SuiteEntry:
    label: str
    generator: str | None = None
    path: str | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        if self.path:
            return {"path": self.path, "sha256": hashlib.sha256(Path(self.path).read_bytes()).hexdigest()[:16]}
        return {"generator": self.generator, "params": self.params}

    @classmethod
    def parse(cls, data: Any, where: str, base_dir: Path, seed: int) -> "SuiteEntry":
        if isinstance(data, str):
            data = {"path": data} if data.endswith(".json") else {"generator": data}
        if not isinstance(data, dict):
            raise _err(where, "a suite entry must be a mapping", "{generator: induction, n_items: 8} or "
                       "{path: suite.json}", data)
        # Generator parameters may sit beside `generator` or under `params`.
        params = dict(data.get("params") or {})
        extra = {k: v for k, v in data.items() if k not in _SUITE_KEYS}
        params.update(extra)
        if "seed" in data:
            params["seed"] = data["seed"]
        if data.get("path"):
            path = Path(str(data["path"])).expanduser()
            path = path if path.is_absolute() else base_dir / path
            if not path.is_file():
                raise _err(f"{where}.path", "suite file not found", "a PromptSuite JSON file", str(path))
            if params:
                raise _err(where, "a suite file takes no generator parameters", "only path and label",
                           sorted(params))
            return cls(_label(data.get("label"), path.stem, where), path=str(path.resolve()))
        name = data.get("generator")
        if not isinstance(name, str):
            raise _err(f"{where}.generator", "a suite entry needs generator or path", ", ".join(GENERATORS),
                       repr(name), fix="or give path: SUITE.json")
        try:
            if name in INPUT_SUITES:  # images / latents: built for the cell's model
                resolved = name
                params.setdefault("seed", seed)
            else:
                resolved, fn = generator(name)
                if "seed" in inspect.signature(fn).parameters:
                    params.setdefault("seed", seed)
            check_suite_params(SuiteRef(name, params=params))
        except InputError as exc:
            what = "unknown suite generator" if exc.got == name else exc.what
            raise _err(where if exc.got != name else f"{where}.generator", what, exc.expected, exc.got,
                       exc.fix) from None
        return cls(_label(data.get("label"), name, where), generator=resolved, params=params)

    @property
    def ref(self) -> SuiteRef:
        """What ``attnscope.tasks.build_suite`` builds for this entry."""
        return SuiteRef(self.path, path=self.path) if self.path else SuiteRef(self.generator, params=self.params)


@dataclass(frozen=True)
class AnalysisEntry:
    label: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "options": self.options}

    @classmethod
    def parse(cls, data: Any, where: str) -> "AnalysisEntry":
        if isinstance(data, str):
            data = {"name": data}
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            raise _err(where, "an analysis entry needs `name`", "a registered name or {name: NAME, options: {...}}",
                       data)
        _check_keys(data, _ANALYSIS_KEYS, where)
        try:
            analysis = get_analysis(data["name"])
        except AttnscopeError as exc:
            raise _err(f"{where}.name", "unknown analysis", exc.expected, data["name"],
                       fix="list them with `attnscope score --help`, or add a module under `imports:`") from None
        options = data.get("options") or {}
        if not isinstance(options, dict):
            raise _err(f"{where}.options", "options must be a mapping", "{key: value}", options)
        params = inspect.signature(analysis.fn).parameters
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            unknown = set(options) - set(params)
            if unknown:
                raise _err(f"{where}.options", f"unknown options for {analysis.name}", sorted(params),
                           sorted(unknown))
        _json(options, f"{where}.options")
        return cls(_label(data.get("label"), data["name"], where), data["name"], dict(options))


@dataclass(frozen=True)
class InterventionEntry:
    label: str
    mode: str = "none"
    heads: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # scale, select, per_position, seed, mean_values

    def identity(self) -> dict[str, Any]:
        return {"mode": self.mode, "heads": self.heads, "options": self.options}

    @classmethod
    def parse(cls, data: Any, where: str) -> "InterventionEntry":
        if data is None or data == "none" or (isinstance(data, dict) and data.get("mode") == "none"):
            return cls(_label(data.get("label") if isinstance(data, dict) else None, "none", where))
        if not isinstance(data, dict):
            raise _err(where, "an intervention must be `none` or a mapping", "{heads: L0H1, mode: zero}", data)
        _check_keys(data, _INTERVENTION_KEYS, where)
        mode = data.get("mode", "zero")
        if mode not in MODES:
            raise _err(f"{where}.mode", "unknown intervention mode", ", ".join(("none",) + MODES), repr(mode))
        heads = data.get("heads")
        if not isinstance(heads, str):
            raise _err(f"{where}.heads", "an intervention needs heads", "e.g. 'L0H1,L1H*'", repr(heads))
        try:
            HeadSet.check_spec(heads)
        except AttnscopeError as exc:
            raise _err(f"{where}.heads", "malformed head spec", exc.expected, heads, exc.fix) from None
        if mode == "rescale" and not isinstance(data.get("scale"), (int, float)):
            raise _err(f"{where}.scale", "rescale needs a scale", "a number (1 = identity)", data.get("scale"))
        if data.get("select", "query") not in ("query", "kv"):
            raise _err(f"{where}.select", "bad head selection", "query or kv", data.get("select"))
        options = {k: data[k] for k in ("scale", "select", "per_position", "seed", "mean_values") if k in data}
        _json(options, where)
        default = f"{mode}:{heads}" + (f"x{data['scale']}" if mode == "rescale" else "")
        return cls(_label(data.get("label"), default, where), mode, heads, options)

    @property
    def is_none(self) -> bool:
        return self.mode == "none"


def _json(value: Any, where: str) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise _err(where, "values must be plain YAML/JSON data", "numbers, strings, lists, mappings",
                   str(exc)) from None
