"""Adapter for TransformerLens 4.x ``TransformerBridge`` (text-only bridges).

Capture goes through the bridge's own ``blocks.{l}.attn.hook_pattern`` hook points (``observe_probs``). What runs
behind that hook depends on the bridge's attention component, and ``attention_path`` records it:

- GPT-2 / Llama-class components (``JointQKVAttentionBridge``, ``PositionEmbeddingsAttentionBridge``) recompute
  attention themselves (matmul + softmax in TransformerLens). The HF model's ``attn_implementation`` is not used at
  all: switching it to ``sdpa`` changes nothing, and the pattern hook always fires.
- Delegating components (plain ``AttentionBridge``: OPT, GPT-Neo, GPT-J, BERT ...) call the HF module and fire
  ``hook_pattern`` on the weights it returns, which exist only under eager attention. ``boot_transformers`` forces
  eager for that reason. If the model was switched back to SDPA the hook stays silent; we then route q/k of the HF
  module through ``hf_route`` (SDPA keeps running, outputs stay bit-identical), or, with
  ``implementation="eager"`` or modules that do not dispatch through ``AttentionInterface``, force eager for the
  capture. ``attention_path`` says which.
- ``boot_native`` bridges run ``hook_pattern`` inside ``NativeAttention`` (``pattern_fn``).

The reference ``validate`` compares against is independent of the bridge: for HF-backed bridges, a clean copy of
the wrapped HF model (same weights, the bridge's wrappers stripped) run with HF's own eager attention; for native
bridges, a plain-torch recomputation from ``hook_q`` / ``hook_k``.

Multimodal bridges are refused (see ``attnscope.probes.adapters.tl_guard``: booting one offline makes TransformerLens
run ``pip install torchvision``). Importing this module changes nothing: the guard is installed when the adapter is
first used (it matches a bridge, or ``boot_bridge`` boots one) and ``tl_guard.uninstall()`` removes it.

Example (offline; ``boot_bridge`` stores the tokenizer in a temporary folder so TransformerLens never needs the hub):
    >>> import transformers
    >>> from attnscope.probes.adapters.tl_bridge import boot_bridge, TLBridgeAdapter
    >>> from attnscope.probes.adapters.tl_bridge import tiny_word_tokenizer
    >>> cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    >>> bridge = boot_bridge(transformers.GPT2LMHeadModel(cfg).eval(), tiny_word_tokenizer(64))  # doctest: +SKIP
    >>> TLBridgeAdapter(bridge).info().tower().n_layers  # doctest: +SKIP
    2
"""

import contextlib
import copy
import math
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..._extras import require
from ...errors import CaptureError, InputError, UnsupportedModelError
from ..adapter import ModelAdapter, Prepared, register_adapter
from ..model_info import ModelInfo, TowerInfo
from ..recorder import Recorder
from ..site import Site
from . import tl_guard
from .hf_route import attention_modules, route_attention
from .hf_text import token_info, tokenize

_PATTERN_HOOK = re.compile(r"^blocks\.(\d+)\.attn\.hook_pattern$")
_WRAPPER = "._original_component"


def _is_bridge(obj: Any) -> bool:
    """True for a TransformerLens ``TransformerBridge`` (by class name: never imports TransformerLens)."""
    return any(c.__name__ == "TransformerBridge" and c.__module__.startswith("transformer_lens")
               for c in type(obj).__mro__)


def tiny_word_tokenizer(vocab_size: int, bos: str = "<s>", eos: str = "</s>", pad: str = "<pad>") -> Any:
    """An offline word-level tokenizer (``w0 w1 ...``) for tiny random-init models and tests."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", pad, bos, eos]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"w{i}": len(specials) + i for i in range(vocab_size - len(specials))})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token=pad, bos_token=bos,
                                   eos_token=eos)


def refuse_unfaithful_config(config: Any) -> None:
    """Refuse HF options TransformerLens ignores, so a bridge would compute another model (GPT-2's
    ``scale_attn_weights=False``: patterns off by up to 0.74, logits by 13.5 on the induction organism)."""
    if getattr(config, "scale_attn_weights", True) is False:
        raise UnsupportedModelError("TransformerLens would compute a different model", expected="attention scaled "
                                    "by 1/sqrt(d_head) (scale_attn_weights=True)", got="scale_attn_weights=False",
                                    fix="capture the HF model directly (attnscope.capture), not through a bridge")


def check_bridge_against_source(bridge: Any, atol: float = 1e-3) -> float:
    """Logits of ``bridge`` vs a clean eager copy of the HF model it wraps, on a short sample: the largest difference
    relative to the logits' scale. Raises UnsupportedModelError past ``atol`` (the bridge is not its source model)."""
    hf = getattr(bridge, "original_model", None)
    from transformers import PreTrainedModel

    if not isinstance(hf, PreTrainedModel):
        return 0.0
    refuse_unfaithful_config(hf.config)
    vocab = int(bridge.cfg.d_vocab)
    ids = torch.randint(0, vocab, (1, min(8, int(getattr(bridge.cfg, "n_ctx", 8) or 8))),
                        generator=torch.Generator().manual_seed(0)).to(next(bridge.parameters()).device)
    with torch.no_grad():
        ours = bridge(ids, return_type="logits").float()
        theirs = clean_hf_copy(hf)(input_ids=ids).logits.float()
    diff = float((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-6))
    if diff > atol:
        raise UnsupportedModelError("this TransformerBridge computes a different model than the HF model it wraps",
                                    expected=f"logits within {atol} (relative) of the source model",
                                    got=f"relative difference {diff:.3g}",
                                    fix="capture the HF model directly (attnscope.load(hf_model))")
    return diff


def boot_bridge(hf_model: nn.Module, tokenizer: Any, name: str | None = None, device: str = "cpu") -> Any:
    """``TransformerBridge.boot_transformers`` around an already-built HF model, without touching the hub.

    Refuses multimodal models before TransformerLens sees them. TransformerLens re-loads the tokenizer from its
    ``name_or_path``; a tokenizer built in memory is saved to a temporary folder first so that works offline.
    """
    require("transformer_lens", "tl")
    tl_guard.install()
    tl_guard.refuse_multimodal(hf_model.config)
    refuse_unfaithful_config(hf_model.config)
    if tokenizer is None:
        raise InputError("boot_bridge needs a tokenizer", expected="a PreTrainedTokenizer(Fast)", got=None,
                         fix="pass tokenizer=...; without one TransformerLens downloads it from the hub")
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.model_bridge.sources import transformers as _tl_hf  # noqa: F401  (adds boot_transformers)

    source = str(getattr(tokenizer, "name_or_path", "") or "")
    if source and Path(source).is_dir():
        return TransformerBridge.boot_transformers(name or source, hf_model=hf_model, tokenizer=tokenizer,
                                                   device=device)
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="attnscope-tok-") as folder:  # only needed while booting
        tokenizer.save_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        return TransformerBridge.boot_transformers(name or folder, hf_model=hf_model, tokenizer=tokenizer,
                                                   device=device)


def _strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        out.setdefault(key.replace(_WRAPPER, ""), value)
    return out


def clean_hf_copy(hf_model: nn.Module) -> nn.Module:
    """A plain copy of a bridged HF model (eager attention, same weights), free of TransformerLens wrappers."""
    config = copy.deepcopy(hf_model.config)
    clean = type(hf_model)._from_config(config, attn_implementation="eager")
    state = _strip_wrappers(hf_model.state_dict())
    target = clean.state_dict()
    missing = [k for k in target if k not in state]
    if missing:
        raise CaptureError("cannot rebuild the HF model behind the bridge for the reference",
                           expected="every HF weight under the bridge's wrappers", got=f"missing {missing[:4]}",
                           fix="validate a bridge booted with boot_transformers(hf_model=...)")
    clean.load_state_dict({k: state[k] for k in target})
    return clean.to(next(hf_model.parameters()).device).eval()


@register_adapter
class TLBridgeAdapter(ModelAdapter):
    """TransformerLens ``TransformerBridge``: attention probabilities from ``blocks.{l}.attn.hook_pattern``."""

    family = "transformer-lens"
    priority = 30

    def __init__(self, module: Any, tokenizer: Any = None, name: str = ""):
        tl_guard.install()
        tl_guard.refuse_multimodal(module)
        self.source_diff = check_bridge_against_source(module)  # a user's own bridge may not be its HF model
        super().__init__(module, tokenizer=tokenizer or getattr(module, "tokenizer", None), name=name)
        self._fired: dict[Site, int] | None = None

    @classmethod
    def matches(cls, module: Any) -> bool:
        if not _is_bridge(module):
            return False
        tl_guard.install()  # first use of the adapter: from now on TransformerLens never pip-installs torchvision
        return True

    # -- structure --------------------------------------------------------------------------------------------------

    def _pattern_hooks(self) -> dict[Site, Any]:
        hooks = {}
        for name, hook in self.module.hook_dict.items():
            match = _PATTERN_HOOK.match(name)
            if match:
                hooks[Site("text", int(match.group(1)), "self")] = hook
        return dict(sorted(hooks.items()))

    def _attn(self, layer: int) -> nn.Module:
        return self.module.blocks[layer].attn

    def _hf_model(self) -> nn.Module | None:
        from transformers import PreTrainedModel

        hf = getattr(self.module, "original_model", None)
        return hf if isinstance(hf, PreTrainedModel) else None

    def _hf_impl(self) -> str:
        hf = getattr(self.module, "original_model", None)
        return str(getattr(getattr(hf, "config", None), "_attn_implementation", None) or "native")

    def _delegates(self, attn: nn.Module) -> bool:
        """True when the component returns the HF module's own weights (which exist only under eager)."""
        from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

        original = getattr(attn, "original_component", None)
        return type(attn).forward is AttentionBridge.forward and not getattr(original, "accepts_pattern_fn", False)

    def info(self) -> ModelInfo:
        cfg = self.module.cfg
        sites = list(self._pattern_hooks())
        n_heads = int(cfg.n_heads)
        tower = TowerInfo(name="text", n_layers=len(sites), n_heads=n_heads,
                          n_kv_heads=int(getattr(cfg, "n_key_value_heads", None) or n_heads),
                          d_head=int(cfg.d_head), kinds=["self"])
        return ModelInfo(family="transformer-lens", adapter=type(self).__name__, towers=[tower], sites=sites,
                         attn_implementation=self._hf_impl(), max_positions=int(getattr(cfg, "n_ctx", 0)) or None,
                         name=self.name or str(getattr(cfg, "model_name", "")))

    def causal_sites(self) -> set[Site]:
        return set(self._pattern_hooks()) if getattr(self.module.cfg, "attention_dir", "causal") == "causal" else set()

    def provenance(self) -> dict:
        import transformer_lens

        prov = super().provenance()
        prov["transformer_lens"] = getattr(transformer_lens, "__version__", "unknown")
        return prov

    # -- inputs and running -----------------------------------------------------------------------------------------

    def prepare(self, inputs: Any) -> Prepared:
        device = next(self.module.parameters()).device
        kwargs = tokenize(inputs, self.tokenizer, device, getattr(self.module.cfg, "n_ctx", None))
        kwargs = {k: v for k, v in kwargs.items() if k in ("input_ids", "attention_mask")}
        return Prepared(kwargs, token_info(kwargs["input_ids"], self.tokenizer, kwargs.get("attention_mask")))

    def sample_inputs(self) -> Any:
        vocab = int(self.module.cfg.d_vocab)
        ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        mask[1, -3:] = 0  # padded second item exercises the masks
        return {"input_ids": ids, "attention_mask": mask}

    def run(self, prepared: Prepared) -> Any:
        kwargs = prepared.kwargs
        with torch.no_grad():
            out = self.module(kwargs["input_ids"], attention_mask=kwargs.get("attention_mask"), return_type="logits")
        if self._fired is not None:
            silent = [str(s) for s, n in self._fired.items() if n == 0]
            if silent:
                raise CaptureError("hook_pattern did not fire", expected="one call per layer", got=silent,
                                   fix="load the HF model with attn_implementation='eager' before booting")
        return out

    # -- capture ----------------------------------------------------------------------------------------------------

    def _hf_configs(self) -> list:
        """Every distinct HF config (model and per-module copies) that carries an attention implementation."""
        hf = self._hf_model()
        seen, configs = set(), []
        for owner in [hf, *(hf.modules() if hf is not None else [])]:
            cfg = getattr(owner, "config", None)
            if cfg is not None and hasattr(cfg, "_attn_implementation") and id(cfg) not in seen:
                seen.add(id(cfg))
                configs.append(cfg)
        return configs

    def _routable(self, attn: nn.Module) -> nn.Module | None:
        """The HF module under a delegating component that dispatches through ``ALL_ATTENTION_FUNCTIONS``."""
        found = attention_modules(getattr(attn, "original_component", None) or nn.Module())
        return found[0][1] if len(found) == 1 else None

    def _plan(self, implementation: str) -> tuple[str, bool, dict[int, Site]]:
        """Attention path, whether to force eager, and the sites to route through ``hf_route`` instead of hooks."""
        impl, paths, force, routed = self._hf_impl(), set(), False, {}
        for site in self._pattern_hooks():
            attn = self._attn(site.layer)
            original = getattr(attn, "original_component", None)
            inner = self._routable(attn)
            if getattr(original, "accepts_pattern_fn", False):
                paths.add("transformer-lens native (hook_pattern inside NativeAttention)")
            elif not self._delegates(attn):
                paths.add(f"transformer-lens recomputed (matmul+softmax in {type(attn).__name__}; "
                          f"HF attn_implementation={impl} unused)")
            elif impl == "eager":
                paths.add("eager (HF weights through hook_pattern)")
            elif implementation == "auto" and inner is not None:
                routed[id(inner)] = site
                paths.add(f"{impl} (hook_pattern silent under {impl}; q/k routed through AttentionInterface)")
            else:
                force = True
                why = "forced; model ran" if implementation == "eager" else "forced: hook_pattern does not fire under"
                paths.add(f"eager ({why} {impl})")
        return ", ".join(sorted(paths)), force, routed

    @contextlib.contextmanager
    def instrument(self, recorder: Recorder, implementation: str = "auto") -> Iterator[None]:
        path, force, routed = self._plan(implementation)
        saved = [(c, c._attn_implementation) for c in self._hf_configs() if c._attn_implementation != "eager"] \
            if force else []
        handles: list[tuple[Any, Any]] = []
        self._fired = {}
        try:
            with contextlib.ExitStack() as stack:
                for cfg, _ in saved:
                    cfg._attn_implementation = "eager"
                if routed:
                    stack.enter_context(route_attention(self._hf_model(), recorder, routed, "auto"))
                for site, hook in self._pattern_hooks().items():
                    if site in routed.values():
                        continue
                    self._fired[site] = 0
                    handles.append((hook, hook.add_hook(self._observer(recorder, site))))
                self.attention_path = path
                yield
        finally:
            for hook, handle in handles:
                handle.hook.remove()
                if handle in hook.fwd_hooks:
                    hook.fwd_hooks.remove(handle)
            for cfg, impl in saved:
                cfg._attn_implementation = impl
            self._fired = None

    def _observer(self, recorder: Recorder, site: Site):
        def observe(pattern: torch.Tensor, hook: Any = None) -> None:
            if self._fired is not None:
                self._fired[site] += 1
            recorder.observe_probs(site, pattern)
            return None

        return observe

    # -- reference --------------------------------------------------------------------------------------------------

    def reference_patterns(self, prepared: Prepared) -> dict[Site, list[torch.Tensor]]:
        hf = self._hf_model()
        if hf is None:
            return self._recomputed_reference(prepared)
        clean = clean_hf_copy(hf)
        with torch.no_grad():
            out = clean(**prepared.kwargs, output_attentions=True)
        weights = [w for w in (getattr(out, "attentions", None) or ()) if torch.is_tensor(w)]
        sites = list(self._pattern_hooks())
        if len(weights) != len(sites):
            raise CaptureError("HF eager reference returned no attention weights per layer",
                               expected=f"{len(sites)} layers", got=len(weights))
        return {site: [w.detach().float().cpu()] for site, w in zip(sites, weights)}

    def _recomputed_reference(self, prepared: Prepared) -> dict[Site, list[torch.Tensor]]:
        """Plain-torch softmax(q k^T / scale) from the bridge's hook_q / hook_k (native, non-rotary bridges)."""
        names: set[str] = set()
        for site in self._pattern_hooks():
            original = getattr(self._attn(site.layer), "original_component", None)
            if getattr(original, "rotary", None) is not None or not hasattr(original, "scale"):
                raise CaptureError("no independent reference for this bridge", expected="an HF-backed bridge or "
                                   "a native bridge without rotary embeddings", got=type(original).__name__)
            names |= {f"blocks.{site.layer}.attn.hook_q", f"blocks.{site.layer}.attn.hook_k"}
        ids, mask = prepared.kwargs["input_ids"], prepared.kwargs.get("attention_mask")
        with torch.no_grad():
            _, cache = self.module.run_with_cache(ids, attention_mask=mask, names_filter=lambda n: n in names)
        out: dict[Site, list[torch.Tensor]] = {}
        for site in self._pattern_hooks():
            original = self._attn(site.layer).original_component
            q = cache[f"blocks.{site.layer}.attn.hook_q"].float().permute(0, 2, 1, 3)
            k = cache[f"blocks.{site.layer}.attn.hook_k"].float().permute(0, 2, 1, 3)
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            scores = q @ k.transpose(-1, -2) / float(original.scale)
            n = scores.shape[-1]
            blocked = torch.ones(n, n, dtype=torch.bool).triu(1) if getattr(original, "causal", True) else \
                torch.zeros(n, n, dtype=torch.bool)
            if mask is not None:
                blocked = blocked | ~mask.bool()[:, None, None, :]
            probs = scores.masked_fill(blocked, -math.inf).softmax(-1).nan_to_num(0.0)
            out[site] = [probs.cpu()]
        return out
