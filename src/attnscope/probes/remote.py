"""Run a capture, or an intervention plan, inside an nnsight trace on an NDIF-compatible backend (``remote=True``).

The model never leaves the server: what travels is nnsight's request (the traced block's source, the inputs, the
plan's per-head editors) and what comes back is what the block saved (per attention module the queries, keys and
mask, or eager weights; the model output). The statistics are then computed here by the same ``Recorder`` as a
local capture, so a remote trace equals the direct path.

- ``remote=True``: nnsight's ``RemoteBackend`` against ``settings.host``. Before anything is serialised, a TCP
  connection to the host is tried with ``settings.timeout`` seconds, so an unreachable backend fails fast with
  ``attnscope.errors.RemoteError`` (never a hang); so does every network or server error after it.
- ``remote="local"``: nnsight's ``LocalSimulationBackend``: the request is serialised and deserialised exactly as
  for the server (local modules hidden), then run here. The offline test of everything up to the request.
- ``remote=False``: an ordinary local nnsight trace.

Settings come from the environment at call time (``RemoteSettings.from_env``): host from
``ATTNSCOPE_NNSIGHT_HOST``, else nnsight's own ``nnsight.CONFIG.API.HOST`` (which honours ``NDIF_HOST`` and
``~/.config/nnsight/config.yaml``); API key from ``NDIF_API_KEY``, else ``nnsight.CONFIG.API.APIKEY``; connect
timeout from ``ATTNSCOPE_NNSIGHT_TIMEOUT`` (seconds, default 10).

Head interventions run in the trace by editing each output projection's input (the same per-head editors as
``apply_plan``, shipped by value): modes ``zero``, ``rescale`` and ``mean`` (with ``mean_values`` in the plan).
``resample`` and ``uniform`` need local hooks and are refused for remote runs.

Example:
    >>> from attnscope.probes.remote import RemoteSettings
    >>> RemoteSettings(host="http://127.0.0.1:9", api_key=None, timeout=1.0).address
    ('127.0.0.1', 9)
"""

import contextlib
import copy
import json
import os
import socket
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import torch

from .._atomic import read_text
from .._extras import require
from ..errors import AttnscopeError, InputError, RemoteError
from .adapter import ModelLike, Prepared, module_of, tokenizer_of
from .adapters.hf_route import attention_modules
from .adapters.hf_text import HFTextAdapter, max_positions_of, token_info, tokenize
from .adapters.nnsight_model import NNsightAdapter, qk_payload, weights_payload
from .capturing import capture
from .head_slices import output_projections
from .interventions import InterventionPlan, _editors
from .tokenizer_loading import load_tokenizer

HOST_ENV, KEY_ENV, TIMEOUT_ENV = "ATTNSCOPE_NNSIGHT_HOST", "NDIF_API_KEY", "ATTNSCOPE_NNSIGHT_TIMEOUT"
REMOTE_MODES = ("zero", "rescale", "mean")
# Modules whose functions the traced block calls; shipped by value (the server has nnsight, torch, transformers,
# but not attnscope).
_BY_VALUE = ("attnscope.probes.remote", "attnscope.probes.adapters.nnsight_model")


@dataclass(frozen=True)
class RemoteSettings:
    """Where the backend is and how long to wait for a connection."""

    host: str
    api_key: str | None
    timeout: float = 10.0

    @classmethod
    def from_env(cls) -> "RemoteSettings":
        nnsight = require("nnsight", "nnsight")

        host = os.environ.get(HOST_ENV) or nnsight.CONFIG.API.HOST
        key = os.environ.get(KEY_ENV) or nnsight.CONFIG.API.APIKEY
        try:
            timeout = float(os.environ.get(TIMEOUT_ENV, "10"))
        except ValueError:
            raise InputError(f"{TIMEOUT_ENV} is not a number", expected="seconds, e.g. 10",
                             got=os.environ.get(TIMEOUT_ENV)) from None
        return cls(host=host, api_key=key or None, timeout=timeout)

    @property
    def address(self) -> tuple[str, int]:
        url = urlparse(self.host)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise RemoteError("bad backend address", expected="http(s)://HOST[:PORT]", got=self.host,
                              fix=f"set {HOST_ENV} (or NDIF_HOST), e.g. https://api.ndif.us")
        return url.hostname, url.port or (443 if url.scheme == "https" else 80)

    def describe(self) -> dict[str, Any]:
        """For provenance: the host and whether a key was set (never the key)."""
        return {"host": self.host, "api_key_set": bool(self.api_key), "timeout_s": self.timeout}


def check_reachable(settings: RemoteSettings) -> None:
    """Open (and close) a TCP connection to the backend within ``settings.timeout`` s; RemoteError if it fails."""
    host, port = settings.address
    try:
        with socket.create_connection((host, port), timeout=settings.timeout):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
        raise RemoteError("NDIF backend unreachable", expected=f"a backend accepting connections at "
                          f"{settings.host} within {settings.timeout:g} s", got=reason,
                          fix=f"check {HOST_ENV} / NDIF_HOST and the network, or run without --remote") from None


@contextlib.contextmanager
def _handshake_timeout(seconds: float) -> Iterator[None]:
    """Give nnsight's websocket handshake a timeout (it has none), then let the job's wait be unbounded."""
    import websocket

    original = websocket.create_connection

    def create_connection(url: str, *args: Any, **kwargs: Any):
        kwargs.setdefault("timeout", seconds)
        connection = original(url, *args, **kwargs)
        connection.settimeout(None)
        return connection

    websocket.create_connection = create_connection
    try:
        yield
    finally:
        websocket.create_connection = original


def _register_by_value() -> None:
    import importlib

    nnsight = require("nnsight", "nnsight")

    for name in _BY_VALUE:
        nnsight.register(importlib.import_module(name))


# ---- the model -----------------------------------------------------------------------------------------------------

def remote_model(model: ModelLike, tokenizer: Any = None, *, task: str | None = None) -> Any:
    """An nnsight ``TransformersModel`` for ``model``: already one, a ``model handle (``attnscope.load``)``/HF module (wrapped with a copy
    of its tokenizer), or a hub repo id (built on the meta device from its config: weights stay on the server)."""
    nnsight = require("nnsight", "nnsight")

    if isinstance(model, nnsight.TransformersModel):
        return model
    if isinstance(model, str):
        if tokenizer is None:
            tokenizer = load_tokenizer(model)  # the pipeline cannot always find it on its own
        try:
            try:
                return nnsight.TransformersModel(model, tokenizer=tokenizer, **({"task": task} if task else {}))
            except RuntimeError:
                if task:
                    raise
                # The task could not be inferred (offline hub): a causal LM is what attnscope captures remotely.
                return nnsight.TransformersModel(model, tokenizer=tokenizer, task="text-generation")
        except Exception as exc:
            raise RemoteError("cannot build the remote model's skeleton", expected="a hub id (or a local folder) "
                              "with a config and a tokenizer", got=f"{type(exc).__name__}: {exc}"[:240],
                              fix="pass task='text-generation' and tokenizer=..., or load the model locally") from None
    module = module_of(model)
    tok = tokenizer if tokenizer is not None else tokenizer_of(model)
    if tok is None:
        raise InputError("an nnsight TransformersModel needs a tokenizer", expected="tokenizer=...", got=None,
                         fix="pass the model's tokenizer (attnscope.load(...) keeps it)")
    if task is None:  # nnsight cannot infer it for a pre-loaded module
        can_generate = getattr(module, "can_generate", None)
        task = "text-generation" if callable(can_generate) and can_generate() else "feature-extraction"
    # TransformersModel re-configures the tokenizer it gets (padding side): give it a copy. BERT-class models have
    # submodules named `output`, which nnsight mounts as `E_output` with a warning per layer (see envoy_path).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*nnsight already serves on every module.*")
        return nnsight.TransformersModel(module, tokenizer=copy.deepcopy(tok), task=task)


def model_key(envoy: Any) -> str:
    """nnsight's remote key for ``envoy``; when the hub cannot canonicalise the repo id, the id as written."""
    try:
        return envoy.to_model_key()
    except Exception:
        from nnsight.modeling import huggingface

        cache = getattr(huggingface, "_ID_CACHE", None)
        repo = getattr(envoy, "repo_id", None)
        if cache is None or not repo:
            raise RemoteError("model has no remote identity", expected="a model loaded from a hub id",
                              got=repr(repo), fix="load the model by its hub name") from None
        cache.setdefault(repo, repo)
        return envoy.to_model_key()


# ---- the plan in the trace -------------------------------------------------------------------------------------

def plan_editors(module: Any, plan: Any) -> dict[int, tuple[Any, Any]]:
    """``layer -> (OutputProjection, editor)`` for a plan that can run in a trace (zero / rescale / mean)."""
    if plan.mode not in REMOTE_MODES:
        raise InputError("intervention mode cannot run in a remote trace", expected=", ".join(REMOTE_MODES),
                         got=plan.mode, fix="run it locally (apply_plan), or use zero / rescale / mean")
    if plan.mode == "mean" and plan.mean_values is None:
        raise InputError("a remote mean ablation needs its means in the plan", expected="plan.mean_values",
                         got=None, fix="build the plan with mean_plan(model, heads, reference_ids) on a local copy")
    projections = output_projections(module)
    query = plan.query_heads(projections)
    with contextlib.ExitStack() as stack:
        editors = _editors(module, plan, query, projections, stack)
    return {layer: (projections[layer], editor) for layer, editor in editors.items()}


def envoy_path(name: str) -> str:
    """An ``nn.Module`` path as nnsight spells it: a submodule named like an envoy attribute (BERT's ``output``)
    is mounted as ``E_output``."""
    import inspect

    from nnsight.intervention.envoy import Envoy

    prefix = getattr(Envoy, "OVERLOAD_PREFIX", "E_")
    return ".".join(f"{prefix}{part}" if inspect.isdatadescriptor(getattr(Envoy, part, None)) else part
                    for part in name.split("."))


def edit_heads(x: torch.Tensor, n_heads: int, d_head: int, editor: Any) -> torch.Tensor:
    """Apply a per-head editor to an output projection's input ``[..., head * d_head]`` (as ``edit_head_outputs``)."""
    heads = x.reshape(*x.shape[:-1], n_heads, d_head)
    return editor(heads).reshape(x.shape)


def trace_block(envoy: Any, kwargs: dict[str, Any], operations: list[tuple], backend: Any) -> tuple[Any, list]:
    """The traced block: per operation, in execution order, read attention (``qk``/``weights``) or edit heads."""
    nnsight = require("nnsight", "nnsight")

    with envoy.trace(**kwargs, backend=backend):
        collected = nnsight.save([])
        for kind, path, arg, n_heads, d_head in operations:
            module = envoy.get(path)
            if kind == "weights":
                collected.append(weights_payload(module.output))
            elif kind == "qk":
                args, kw = getattr(module.source, arg).inputs
                collected.append(qk_payload(args, kw))
            else:
                module.input = edit_heads(module.input, n_heads, d_head, arg)
        output = nnsight.save(envoy.output)
    return output, collected


class RemoteNNsightAdapter(NNsightAdapter):
    """``NNsightAdapter`` whose trace runs on a backend (remote, local simulation or local) and applies a plan."""

    family = "nnsight-remote"

    def __init__(self, envoy: Any, tokenizer: Any = None, name: str = "", *, remote: "bool | str" = True,
                 plan: Any = None, settings: RemoteSettings | None = None):
        if remote not in (True, False, "local"):
            raise InputError("bad remote mode", expected="True, False or 'local'", got=repr(remote))
        super().__init__(envoy, tokenizer=tokenizer, name=name)
        self.remote, self.plan = remote, plan
        self.settings = settings or (RemoteSettings.from_env() if remote is True else None)
        self.editors = plan_editors(self.module, plan) if plan is not None else {}

    def provenance(self) -> dict:
        prov = super().provenance()
        prov["remote"] = {"mode": self.remote if isinstance(self.remote, str) else bool(self.remote),
                          **(self.settings.describe() if self.settings else {}),
                          "plan": self.plan.to_dict() if self.plan is not None else None}
        return prov

    def prepare(self, inputs: Any) -> Prepared:
        on_meta = next(self.module.parameters()).device.type == "meta"
        if not (on_meta and isinstance(self.inner, HFTextAdapter)):
            return super().prepare(inputs)
        # A remote skeleton lives on the meta device: keep the inputs on the CPU, the server places them.
        kwargs = tokenize(inputs, self.tokenizer, torch.device("cpu"), max_positions_of(self.module.config))
        return Prepared(kwargs, token_info(kwargs["input_ids"], self.tokenizer, kwargs.get("attention_mask")))

    def _operations(self, plan: list) -> list[tuple]:
        """Reads of ``plan`` and the head edits, ordered as the forward pass meets them."""
        names = {id(m): n for n, m in self.module.named_modules()}
        order = {n: i for i, (n, _) in enumerate(attention_modules(self.module))}
        events = []
        for _site, path, kind, op in plan:
            events.append(((order.get(path, 0), 0 if kind == "qk" else 2), (kind, envoy_path(path), op, 0, 0)))
        for layer, (proj, editor) in self.editors.items():
            attn_path = names[id(proj.attention)]
            proj_path = names[id(proj.module)]
            inside = proj_path.startswith(attn_path + ".")  # GPT-2, Llama: projection runs inside the module
            events.append(((order.get(attn_path, layer), 1 if inside else 3),
                           ("edit", envoy_path(proj_path), editor, proj.n_heads, proj.d_head)))
        return [op for _, op in sorted(events, key=lambda e: e[0])]

    def _backend(self) -> Any:
        if self.remote is True:
            from nnsight.intervention.backends.remote import RemoteBackend

            return RemoteBackend(model_key(self.envoy), host=self.settings.host, api_key=self.settings.api_key or "",
                                 env=self.envoy._remoteable_get_env(), blocking=True)
        if self.remote == "local":
            from nnsight.intervention.backends.local import LocalSimulationBackend

            return LocalSimulationBackend(self.envoy)
        return None

    def _traced(self, prepared: Prepared, plan: list) -> tuple[Any, list[dict]]:
        operations = self._operations(plan)
        if self.remote is False:
            return trace_block(self.envoy, prepared.kwargs, operations, None)
        _register_by_value()
        if self.remote == "local":
            return trace_block(self.envoy, prepared.kwargs, operations, self._backend())
        check_reachable(self.settings)
        try:
            with _handshake_timeout(self.settings.timeout):
                return trace_block(self.envoy, prepared.kwargs, operations, self._backend())
        except AttnscopeError:
            raise
        except Exception as exc:
            raise _as_remote_error(exc, self.settings) from exc

    def run(self, prepared: Prepared) -> Any:
        if self._recorder is not None:
            return super().run(prepared)
        with torch.no_grad():  # no capture: the plan (if any) runs in the trace, only the output comes back
            return self._traced(prepared, [])[0]


def _as_remote_error(exc: Exception, settings: RemoteSettings) -> RemoteError:
    from nnsight.intervention.backends.remote import RemoteError as NNsightRemoteError

    text = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    if isinstance(exc, NNsightRemoteError):
        return RemoteError("the NDIF backend rejected or failed the job", expected="a completed remote job",
                           got=text, fix="check the API key (NDIF_API_KEY), the model's availability on the backend, "
                           "and the message above")
    return RemoteError("remote nnsight run failed", expected=f"a reachable NDIF backend at {settings.host}", got=text,
                       fix=f"check {HOST_ENV} / NDIF_HOST and NDIF_API_KEY, or run without --remote")


# ---- entry points ---------------------------------------------------------------------------------------------------

def remote_adapter(model: ModelLike, *, remote: "bool | str" = True, plan: Any = None,
                   settings: RemoteSettings | None = None, tokenizer: Any = None,
                   task: str | None = None) -> RemoteNNsightAdapter:
    """The adapter that runs ``model`` through a (remote) nnsight trace; usable wherever ``capture`` takes a model."""
    envoy = remote_model(model, tokenizer, task=task)
    name = getattr(model, "name", None) or getattr(envoy, "repo_id", None) or type(envoy._module).__name__
    return RemoteNNsightAdapter(envoy, tokenizer=envoy.tokenizer, name=str(name), remote=remote, plan=plan,
                                settings=settings)


def remote_capture(model: ModelLike, inputs: Any, *, remote: "bool | str" = True, plan: Any = None,
                   settings: RemoteSettings | None = None, task: str | None = None, **capture_options: Any):
    """``capture(...)`` through an nnsight trace on the backend, with ``plan`` applied in the trace.

    ``capture_options`` are those of ``attnscope.capture`` (``stats``, ``heads``, ``rows`` ...). Returns an
    ``AttentionTrace`` whose provenance records the backend (host, never the key) and the plan.
    """
    adapter = remote_adapter(model, remote=remote, plan=plan, settings=settings, task=task)
    return capture(adapter, inputs, **capture_options)


def remote_run(model: ModelLike, inputs: Any, *, remote: "bool | str" = True, plan: Any = None,
               settings: RemoteSettings | None = None) -> Any:
    """Run ``model`` on ``inputs`` in a (remote) trace with ``plan`` applied; returns the model output."""
    adapter = remote_adapter(model, remote=remote, plan=plan, settings=settings)
    return adapter.run(adapter.prepare(inputs))


def plan_from_json(text_or_path: str) -> Any:
    """An ``InterventionPlan`` from a JSON string or file (``InterventionPlan.to_dict`` format)."""

    text = text_or_path
    fix = "write the plan with InterventionPlan.to_dict() (json.dumps)"
    if not text.lstrip().startswith("{"):
        text = read_text(text, "intervention plan", "a JSON file (UTF-8)")
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise InputError("intervention plan is not valid JSON", expected="InterventionPlan.to_dict() output",
                         got=str(exc)[:200], fix=fix) from None
    if not isinstance(data, dict):
        raise InputError("intervention plan is not a JSON object", expected="InterventionPlan.to_dict() output",
                         got=type(data).__name__, fix=fix)
    try:
        return InterventionPlan.from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError("malformed intervention plan", expected="InterventionPlan.to_dict() output",
                         got=f"{type(exc).__name__}: {exc}"[:200], fix=fix) from None


__all__ = ["REMOTE_MODES", "RemoteNNsightAdapter", "RemoteSettings", "check_reachable", "edit_heads", "envoy_path",
           "model_key", "plan_editors", "plan_from_json", "remote_adapter", "remote_capture", "remote_model",
           "remote_run"]
