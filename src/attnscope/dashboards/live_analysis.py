"""Analyses of a live capture, run from the page's Analysis card: the server side, tested without a browser.

- ``score``: a registered head analysis (``SCORE_ANALYSES``, those that work on one input) through the task layer's
  ``run_analysis``, on a one-item suite holding exactly the captured token ids; a layer x head grid per metric.
  For a causal LM every position predicts the next token of the text (the task metric of ``importance`` and
  ``ablation-sweep``); encoders are scored by the embedding metric of the task layer.
- ``attribute``: token attribution of the capture, ``rollout`` / ``flow`` (read out at the last token of a causal
  LM, averaged over tokens for an encoder, as the page's rollout figure) or ``relevance`` (Chefer et al., at the
  library's output position: the last token, or [CLS] for an encoder).
- ``patch``: the effect of patching each head from a corrupted input (same number of tokens) on the logit
  difference answer - foil at the last position (``exact`` activation patching, or the ``atp`` / ``atp*``
  estimates); causal LMs only.

Each result is a ``ResultTable`` (``save_analysis`` writes it into the results folder, ``live/``).

Example:
    >>> from attnscope.dashboards.live_analysis import parse_token
    >>> parse_token("#42", None, 100), parse_token("7", None, 100)
    (42, 7)
"""

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..circuits.attention_rollout import rollout
from ..circuits.flow import attention_flow
from ..circuits.gradient_patching import attribution_patching
from ..circuits.patch_pairs import PatchPairs
from ..circuits.patching import activation_patching
from ..circuits.relevance_propagation import relevance
from ..datasets import PromptItem, PromptSuite
from ..errors import InputError
from ..probes.adapter import as_adapter, tokenizer_of
from ..probes.capturing import vocab_size_of
from ..results import ResultTable
from ..tasks.analyses import get_analysis, run_analysis
from ..viz.heads import head_values
from .files import ResultsRoot
from .live_state import DENSE_LIMIT, MODEL_LOCK, LiveCapture, parse_ids

SCORE_ANALYSES = ("head-stats", "sinks", "prev-token", "duplicate", "induction", "importance", "ablation-sweep")
ATTRIBUTION_METHODS = ("rollout", "flow", "relevance")
PATCH_METHODS = ("exact", "atp", "atp*")
FOLDER = "live"


@dataclass
class LiveResult:
    """One analysis of capture ``key``: ``kind`` (score, attribute, patch), what ran, its table and a summary."""

    key: str
    kind: str
    name: str
    table: ResultTable
    summary: str
    seconds: float
    values: np.ndarray | None = None   # attribute: per token
    title: str = ""

    def metrics(self) -> list[str]:
        """The per-head metrics of the table (score and patch grids)."""
        df = self.table.df
        if "layer" not in df or "head" not in df:
            return []
        rows = df[(df["layer"] >= 0) & (df["head"] >= 0)]
        return list(dict.fromkeys(rows["metric"].astype(str)))

    def grid(self, metric: str | None = None) -> np.ndarray:
        """``[layer, head]`` values of ``metric`` (default the first per-head metric)."""
        return head_values(self.table, metric or self.metrics()[0]).to_numpy()


def _dense(cap: LiveCapture, what: str) -> None:
    """InputError unless ``cap`` is a dense text capture (image and diffusion captures have their own card)."""
    if getattr(cap, "media", None) is not None:
        raise InputError(f"{what} works on text captures", expected="a capture of a text model",
                         got=f"{getattr(cap, 'kind', 'media')} capture of {cap.model_name}",
                         fix="capture text with a text model (this capture's card shows its image or steps)")
    if not cap.dense:
        raise InputError(f"{what} needs the dense capture", expected=f"an input of at most {DENSE_LIMIT} tokens",
                         got=f"{cap.n_tokens} tokens", fix="capture a shorter input")


def capture_ids(handle: Any, cap: LiveCapture) -> list[int]:
    """The token ids the capture ran on (special tokens included)."""
    return as_adapter(handle).prepare(cap.inputs).kwargs["input_ids"][0].tolist()


def live_suite(handle: Any, cap: LiveCapture) -> PromptSuite:
    """A one-item suite of the captured ids; for a causal LM every position predicts the next token of the text."""
    ids = capture_ids(handle, cap)
    metadata = {}
    if cap.causal and len(ids) > 1:
        metadata["queries"] = [{"position": t, "answer": ids[t + 1]} for t in range(len(ids) - 1)]
    return PromptSuite(f"live capture {cap.key}", [PromptItem(ids=ids, metadata=metadata)], seed=0)


def score(handle: Any, cap: LiveCapture, name: str) -> LiveResult:
    """Run the registered analysis ``name`` (one of ``SCORE_ANALYSES``) on the capture's input."""
    if name not in SCORE_ANALYSES:
        raise InputError("analysis not offered on the live page", expected=SCORE_ANALYSES, got=str(name)[:60],
                         fix="pick one of the list (the results tab and `attnscope score` run the others)")
    _dense(cap, "scoring")
    start = time.perf_counter()
    with MODEL_LOCK:
        table = run_analysis(get_analysis(name), handle, live_suite(handle, cap), {},
                             offered={"progress": False, "batch_size": 1}, seed=0)
    result = LiveResult(cap.key, "score", name, table, "", time.perf_counter() - start)
    if not result.metrics():
        raise InputError("the analysis gave no per-head rows on this input", expected="a layer x head table",
                         got=f"{name}: {len(table.df)} rows", fix="pick another analysis")
    result.summary = (f"{name} on capture {cap.key} in {result.seconds * 1000:.0f} ms · metrics: "
                      f"{', '.join(result.metrics())} · click a cell to select its head")
    return result


def _readout(cap: LiveCapture) -> tuple[Any, str]:
    if cap.causal:
        return cap.n_tokens - 1, f"the last token ({cap.tokens[-1]!r})"
    return "mean", "the mean over tokens"


def attribution_values(cap: LiveCapture, method: str = "rollout", handle: Any = None) -> tuple[np.ndarray, str]:
    """Per-token attribution of ``method`` and a title. ``rollout`` / ``flow``: after the last layer, read out at the
    last token (causal models) or averaged over tokens (encoders); ``relevance`` needs the model ``handle``."""
    if method not in ATTRIBUTION_METHODS:
        raise InputError("unknown attribution method", expected=ATTRIBUTION_METHODS, got=str(method)[:40])
    readout, where = _readout(cap)
    if method == "rollout":
        values = np.asarray(rollout(cap.attn(), readout=readout))[-1]
        return values, f"attention rollout to the input tokens, read out at {where}"
    if method == "flow":
        joint = np.asarray(attention_flow(cap.attn(), layers=[-1]))[-1]  # [query, key], rows sum to 1
        values = joint.mean(0) if readout == "mean" else joint[readout]
        return values, f"attention flow (exact max-flow) to the input tokens, read out at {where}"
    if handle is None:
        raise InputError("relevance needs the model", expected="the model handle", got=None)
    with MODEL_LOCK:
        result = relevance(handle, cap.inputs)
    row = result.row.double().numpy()
    what = "the top next token" if cap.causal else "the mean-pooled embedding's norm"
    return row, (f"relevance (Chefer et al. 2021) of {what}, row of token {result.position} "
                 f"({cap.tokens[result.position]!r})")


def attribute(handle: Any, cap: LiveCapture, method: str) -> LiveResult:
    """Token attribution of the capture as a result (``values`` per token, a ``ResultTable`` to save)."""
    _dense(cap, "attribution")
    start = time.perf_counter()
    values, title = attribution_values(cap, method, handle)
    records = [{"analysis": "attribution", "layer": -1 if method == "relevance" else cap.n_layers - 1, "head": -1,
                "metric": method, "value": float(v), "token_index": i, "token": t}
               for i, (t, v) in enumerate(zip(cap.tokens, values))]
    table = ResultTable.from_records(records, provenance={"model": cap.model_name, "method": method, "what": title})
    seconds = time.perf_counter() - start
    top = int(np.argmax(values))
    summary = (f"{method} on capture {cap.key} in {seconds * 1000:.0f} ms · largest: token {top} "
               f"{cap.tokens[top]!r} ({float(values[top]):.3f})")
    return LiveResult(cap.key, "attribute", method, table, summary, seconds, np.asarray(values, np.float64), title)


def parse_token(text: str, tokenizer: Any, vocab: int | None) -> int:
    """A token id from ``#123`` (an id), digits (an id, for models without a tokenizer) or a text that the
    tokenizer turns into exactly one token (e.g. `` Paris``)."""
    text = text or ""
    digits = re.fullmatch(r"#?\s*(\d+)", text.strip())
    if digits and (text.strip().startswith("#") or tokenizer is None):
        index = int(digits.group(1))
    elif tokenizer is None:
        raise InputError("this model has no tokenizer", expected="a token id, e.g. #42", got=repr(text)[:40])
    else:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) != 1:
            raise InputError("the answer and the foil must be one token each", expected="one token (or #id)",
                             got=f"{text!r} -> {len(ids)} tokens", fix="type a single word piece, or #id")
        index = int(ids[0])
    if vocab is not None and not 0 <= index < vocab:
        raise InputError("token id outside the vocabulary", expected=f"0 <= id < {vocab}", got=index)
    return index


def _corrupt_ids(handle: Any, cap: LiveCapture, raw: str, clean: list[int]) -> list[int]:
    if not isinstance(raw, str) or not raw.strip():
        raise InputError("patching needs a corrupted input", expected="a corrupted version of the captured text",
                         got="nothing", fix="type it in the corrupted-text box (same number of tokens)")
    inputs = raw if isinstance(cap.inputs, str) else parse_ids(raw)
    ids = as_adapter(handle).prepare(inputs).kwargs["input_ids"][0].tolist()
    if len(ids) != len(clean):
        raise InputError("the corrupted input must have as many tokens as the captured one",
                         expected=f"{len(clean)} tokens", got=f"{len(ids)} tokens",
                         fix="change words for words of one token each")
    return ids


def _top_next(handle: Any, ids: list[int]) -> torch.Tensor:
    module = as_adapter(handle).module
    device = next(module.parameters()).device
    with torch.no_grad():
        logits = module(input_ids=torch.tensor([ids], device=device)).logits[0, -1].float().cpu()
    return logits


def decode(handle: Any, index: int) -> str:
    tokenizer = tokenizer_of(handle)
    return repr(tokenizer.decode([int(index)])) if tokenizer is not None else f"#{int(index)}"


def pair_of(handle: Any, cap: LiveCapture, corrupt: str, answer: str = "", foil: str = "") -> PatchPairs:
    """The clean/corrupted pair of the page: answer (default the top next token on the clean input) and foil
    (default the top next token on the corrupted input, or the clean input's second if that is the answer)."""
    if not cap.causal:
        raise InputError("patching needs a causal LM", expected="a model that predicts the next token",
                         got=f"{cap.model_name} (an encoder)", fix="pick a zoo organism such as zoo:induction-2l")
    _dense(cap, "patching")
    clean = capture_ids(handle, cap)
    bad = _corrupt_ids(handle, cap, corrupt, clean)
    tokenizer, vocab = tokenizer_of(handle), vocab_size_of(as_adapter(handle).module)
    with MODEL_LOCK:
        clean_logits = _top_next(handle, clean)
        bad_top = int(_top_next(handle, bad).argmax())
    good = parse_token(answer, tokenizer, vocab) if (answer or "").strip() else int(clean_logits.argmax())
    if (foil or "").strip():
        wrong = parse_token(foil, tokenizer, vocab)
    else:
        wrong = bad_top if bad_top != good else next(int(i) for i in clean_logits.topk(2).indices if int(i) != good)
    if wrong == good:
        raise InputError("the answer and the foil are the same token", expected="two different tokens",
                         got=decode(handle, good), fix="type another foil")
    return PatchPairs.from_ids([clean], [bad], answers=[[good]], wrong=[[wrong]], name=f"live capture {cap.key}")


def patch(handle: Any, cap: LiveCapture, corrupt: str, answer: str = "", foil: str = "",
          method: str = "exact") -> LiveResult:
    """Patch every head from the corrupted input into the clean run (``noise``), effect on logit(answer) -
    logit(foil) at the last position: ``exact`` activation patching or the ``atp`` / ``atp*`` estimates."""
    if method not in PATCH_METHODS:
        raise InputError("unknown patching method", expected=PATCH_METHODS, got=str(method)[:40])
    pairs = pair_of(handle, cap, corrupt, answer, foil)
    start = time.perf_counter()
    with MODEL_LOCK:
        if method == "exact":
            table = activation_patching(handle, pairs, "logit_diff")
        else:
            table = attribution_patching(handle, pairs, "logit_diff", method=method)
    seconds = time.perf_counter() - start
    good, wrong = pairs.answers[0][0], pairs.wrong[0][0]
    label = "exact" if method == "exact" else f"{method}, estimate"
    table.provenance.update({"model": cap.model_name, "answer": good, "foil": wrong, "capture": cap.key})
    title = (f"patching effect on logit diff {decode(handle, good)} − {decode(handle, wrong)} ({label})"
             + ("<br><sup>atp*: a magnitude (AtP* with GradDrop), no sign</sup>" if method == "atp*" else ""))
    head = f"patching ({label}) on capture {cap.key} in {seconds * 1000:.0f} ms · answer {decode(handle, good)} " \
           f"vs foil {decode(handle, wrong)}"
    if method == "exact":
        prov = table.provenance
        head += f" · logit diff clean {prov['clean_metric']:+.3f}, corrupted {prov['corrupt_metric']:+.3f}"
    return LiveResult(cap.key, "patch", method, table, head, seconds, None, title)


def save_analysis(result: LiveResult, cap: LiveCapture, root: ResultsRoot) -> str:
    """Write ``result``'s table under ``root/live`` (atomic, a new name each time); returns the relative path."""
    folder = Path(root.root) / FOLDER
    model = re.sub(r"[^A-Za-z0-9_.-]+", "-", cap.model_name).strip("-.")[:40] or "model"
    what = re.sub(r"[^A-Za-z0-9_-]+", "", result.name.replace("*", "star"))
    stem = f"{model}_{cap.key}_{result.kind}-{what}_{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = folder / f"{stem}.parquet", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}.parquet"
    result.table.provenance.setdefault("model", cap.model_name)
    result.table.provenance.update({"live_analysis": result.kind, "name": result.name})
    written = result.table.save(path)
    return Path(written).relative_to(root.root).as_posix()


__all__ = ["ATTRIBUTION_METHODS", "PATCH_METHODS", "SCORE_ANALYSES", "LiveResult", "attribute", "attribution_values",
           "capture_ids", "live_suite", "pair_of", "parse_token", "patch", "save_analysis", "score"]
