"""Models split across devices: parse ``--device-map`` / ``max_memory`` values, build a layer split, dispatch an
already-built model with accelerate, and describe where a model's weights live.

``attnscope.load(name, device_map=..., max_memory=..., offload_folder=...)`` passes these to the model's
``from_pretrained`` (accelerate places each layer; ``"disk"`` keeps a layer's weights in ``offload_folder`` and
moves them in at run time). Capture, streaming statistics and head interventions work unchanged on such models:
accelerate's hooks move every layer's inputs to that layer's device, the recorder moves what it keeps to the CPU,
and the intervention editors move their tables to the tensor they edit.

Example:
    >>> from attnscope.probes.device_map import parse_device_map, parse_max_memory
    >>> parse_device_map("auto"), parse_device_map('{"transformer.h.0": "cpu", "transformer.h.1": "disk"}')
    ('auto', {'transformer.h.0': 'cpu', 'transformer.h.1': 'disk'})
    >>> parse_max_memory("0=20GiB,cpu=60GiB")
    {0: '20GiB', 'cpu': '60GiB'}
"""

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._extras import require
from ..errors import InputError
from .adapter import ModelLike, module_of

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _device_key(key: Any) -> Any:
    """``"0"`` -> 0 (a CUDA index), other names unchanged."""
    text = str(key).strip()
    return int(text) if text.isdigit() else text


def parse_device_map(value: Any) -> "str | dict[str, Any] | None":
    """A device map from a CLI/YAML value: a strategy name, a dict, a JSON object string, or a ``.json`` file."""
    if value is None or isinstance(value, dict):
        return None if value is None else {str(k): _device_key(v) for k, v in value.items()}
    text = str(value).strip()
    if text in STRATEGIES:
        return text
    if text.endswith(".json") and Path(text).expanduser().is_file():
        text = Path(text).expanduser().read_text()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError("device map is not valid JSON", expected='{"module.name": "cpu" | 0 | "disk"}',
                             got=str(exc)) from None
        return parse_device_map(data)
    if text in ("cpu", "mps", "meta") or text.startswith(("cuda", "xpu")) or text.isdigit():
        return {"": _device_key(text)}  # the whole model on one device
    raise InputError("bad device map", expected=f"one of {', '.join(STRATEGIES)}, a device, a JSON object or a "
                     ".json file", got=text, fix='e.g. --device-map auto or --device-map \'{"model.layers.0": 0}\'')


def parse_max_memory(value: Any) -> "dict[Any, str] | None":
    """``{0: "20GiB", "cpu": "60GiB"}`` from a dict or ``"0=20GiB,cpu=60GiB"``."""
    if value is None:
        return None
    if isinstance(value, dict):
        return {_device_key(k): str(v) for k, v in value.items()}
    out = {}
    for part in str(value).split(","):
        key, sep, amount = part.partition("=")
        if not sep or not amount.strip():
            raise InputError("bad max_memory entry", expected="DEVICE=AMOUNT[,DEVICE=AMOUNT]", got=part,
                             fix="e.g. 0=20GiB,cpu=60GiB")
        out[_device_key(key)] = amount.strip()
    return out


def layer_container(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The qualified name and the ``ModuleList`` of the model's transformer blocks (the longest list)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        raise InputError("no list of layers found to split", expected="a model with a ModuleList of blocks",
                         got=type(model).__name__, fix="write the device map by hand")
    return best


def split_layers(model: nn.Module, devices: list[Any], *, rest: Any = None) -> dict[str, Any]:
    """An explicit device map putting consecutive blocks on ``devices`` in order (near-equal chunks).

    Every module outside the block list (embeddings, final norm, head) goes to ``rest`` (default ``devices[0]``).
    ``"disk"`` in ``devices`` offloads those blocks (give ``offload_folder`` when loading or dispatching).
    """
    if not devices:
        raise InputError("no devices to split over", expected="a non-empty list", got=devices)
    model = module_of(model)
    prefix, blocks = layer_container(model)
    rest = devices[0] if rest is None else rest
    mapping: dict[str, Any] = {}
    n = len(blocks)
    for i in range(n):
        mapping[f"{prefix}.{i}"] = devices[min(i * len(devices) // n, len(devices) - 1)]
    parts = prefix.split(".")
    for depth in range(len(parts)):  # siblings of every module on the path down to the block list
        parent_name = ".".join(parts[:depth])
        parent = model.get_submodule(parent_name) if parent_name else model
        for child, _ in parent.named_children():
            if child != parts[depth]:
                mapping[f"{parent_name}.{child}" if parent_name else child] = rest
    own = [n for n, _ in model.named_parameters(recurse=False)] + [n for n, _ in model.named_buffers(recurse=False)]
    if own:
        mapping.update({name: rest for name in own})
    return mapping


def dispatch(model: nn.Module, device_map: dict[str, Any], *, offload_folder: "str | Path | None" = None) -> nn.Module:
    """Place an already-built model with accelerate's ``dispatch_model`` (``"disk"`` entries need a folder).

    Weights mapped to ``"disk"`` are written to ``offload_folder`` and the model holds them on the meta device;
    accelerate's hooks load them for each forward. Returns the model (modified in place).
    """
    dispatch_model = require("accelerate", "devices").dispatch_model

    main = next((d for d in device_map.values() if d not in ("disk", "meta")), "cpu")
    if "disk" in device_map.values() and offload_folder is None:
        raise InputError("disk offload needs a folder", expected="offload_folder=...", got=None,
                         fix="pass offload_folder (any writable directory)")
    kwargs: dict[str, Any] = {"main_device": main}
    if offload_folder is not None:
        kwargs["offload_dir"] = str(offload_folder)
    return dispatch_model(model, device_map=device_map, **kwargs)


def input_device(model: nn.Module) -> torch.device:
    """Where inputs should be put: the input embedding's device, skipping meta (offloaded) placements."""
    model = module_of(model)
    try:
        weight = model.get_input_embeddings().weight
        if weight.device.type != "meta":
            return weight.device
    except (AttributeError, NotImplementedError):
        pass
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def placement(model: ModelLike) -> dict[str, int]:
    """Parameters per placement (``cpu``, ``cuda:0``, ``disk`` ...), from ``hf_device_map`` when there is one."""
    model = module_of(model)
    device_map = getattr(model, "hf_device_map", None)
    counts: Counter = Counter()
    for name, p in model.named_parameters():
        where = str(p.device)
        if device_map:
            match = max((k for k in device_map if k == "" or name == k or name.startswith(k + ".")), key=len,
                        default=None)
            if match is not None:
                where = str(device_map[match])
                where = f"cuda:{where}" if where.isdigit() else where
        counts[where] += p.numel()
    return dict(counts)


__all__ = ["STRATEGIES", "dispatch", "input_device", "layer_container", "parse_device_map", "parse_max_memory",
           "placement", "split_layers"]
