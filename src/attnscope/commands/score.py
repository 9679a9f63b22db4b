"""``attnscope score ANALYSIS --model M --suite S [suite options] [--heads] --out results.parquet``.

ANALYSIS is any registered analysis (``attnscope score list``): retrieval, sinks, induction, prev-token,
duplicate, streaming-llm, pattern, and whatever other modules register. Suites by name: induction, needle,
needle-text, recall, ioi, agreement, sentences, bigram (Bigram-Backcopy), or a path to a suite JSON file; a zoo
organism's card supplies the suite parameters it was trained with. Prints the top heads of the analysis' main
metric and writes the ResultTable. Analyses that accept ``partial`` (retrieval) save per-sample rows
to ``OUT.partial.parquet`` as they go; rerunning the same command resumes from it (``--restart`` discards it).
"""

import argparse
import ast
import inspect
import sys
from pathlib import Path
from typing import Any

from ..errors import AnalysisError, InputError
from .parsing import int_list

SUITES = ("induction", "needle", "needle-text", "recall", "ioi", "agreement", "sentences", "bigram", "shapes")
_UNIVERSAL = ("heads", "batch_size", "progress")  # passed to analyses that take **options
_NAMED_ONLY = ("partial",)


def _floats(spec: str | None) -> list[float] | None:
    if not spec:
        return None
    try:
        return [float(v) for v in spec.split(",")]
    except ValueError:
        raise InputError("malformed number list", expected="e.g. 0.1,0.5,0.9", got=spec) from None


_GENERATORS = {"induction": "induction", "needle": "needle_tokens", "recall": "associative_recall",
               "agreement": "agreement", "bigram": "bigram_backcopy"}


def _zoo_suite_params(model: Any, suite: str) -> dict:
    """Suite parameters from a zoo organism's card: all of its data parameters when the suite is the one it was
    trained on, else only its vocabulary size and BOS id (when the suite takes them)."""
    name = getattr(model, "name", "") or ""
    if not name.startswith("zoo:") or suite not in _GENERATORS:
        return {}
    from .. import datasets as ds
    from .. import zoo

    try:
        data = zoo.load_card(name[4:]).get("data", {})
    except Exception:  # noqa: BLE001 - no card means plain defaults
        return {}
    params = {k: v for k, v in dict(data.get("params", {})).items() if k not in ("n_items", "seed", "name")}
    generator = _GENERATORS[suite]
    accepted = inspect.signature(getattr(ds, generator)).parameters
    if data.get("generator") != generator:
        params = {k: v for k, v in params.items() if k in ("vocab_size", "bos_id")}
    return {k: v for k, v in params.items() if k in accepted}


def _sentences_suite(n: int, seed: int, per_item: int = 3) -> Any:
    import numpy as np

    from ..datasets import PromptItem, PromptSuite
    from ..datasets._text import sentences

    rng = np.random.default_rng(seed)
    items = [PromptItem(text=" ".join(sentences(rng, per_item))) for _ in range(int(n))]
    return PromptSuite("sentences", items, seed=seed, generator="sentences",
                       params={"n_items": int(n), "sentences_per_item": per_item})


def build_suite(name: str, model: Any, args: argparse.Namespace) -> Any:
    """The named suite, sized by the command-line options and fitted to the model (vocabulary, tokenizer)."""
    from .. import datasets as ds

    if Path(name).suffix == ".json":
        return ds.PromptSuite.from_json(Path(name))
    if name not in SUITES:
        raise InputError("unknown suite", expected=list(SUITES) + ["PATH.json"], got=name,
                         fix="`attnscope score --help` lists the suites")
    for option in ("n_items", "seq_len", "vocab_size", "needle_len"):
        value = getattr(args, option, None)
        if value is not None and value < 1:
            raise InputError(f"--{option.replace('_', '-')} must be positive", expected=">= 1", got=value,
                             fix=f"e.g. --{option.replace('_', '-')} 16")
    if name == "shapes":
        return shapes_suite(model, args.n_items, args.seed)
    tok = model.adapter.tokenizer
    vocab = int(getattr(model.adapter.module.config, "vocab_size", 128))
    n, seed = args.n_items, args.seed
    params = _zoo_suite_params(model, name)
    if args.vocab_size:
        if args.vocab_size > vocab:
            raise InputError("--vocab-size larger than the model's vocabulary", expected=f"<= {vocab}",
                             got=args.vocab_size, fix=f"leave --vocab-size out (the model's {vocab}) or lower it")
        params["vocab_size"] = args.vocab_size
    if args.seq_len:
        params["seq_len"] = args.seq_len
    text_suite = name in ("needle-text", "ioi", "sentences")
    if text_suite and tok is None:
        raise InputError(f"suite {name!r} is text, the model has no tokenizer", expected="a token-level suite",
                         got=name, fix="use induction, needle, recall or agreement")
    if name == "induction":
        return ds.induction(n, **{"vocab_size": vocab, **params}, seed=seed)
    if name == "needle":
        return ds.needle_tokens(n, **{"vocab_size": vocab, "needle_len": args.needle_len, **params}, seed=seed)
    if name == "recall":
        params.pop("seq_len", None)
        return ds.associative_recall(n, **{"vocab_size": vocab, **params}, seed=seed)
    if name == "agreement":
        return ds.agreement(n, **{"vocab_size": vocab, **params}, seed=seed)
    if name == "bigram":
        return ds.bigram_backcopy(n, **{"vocab_size": vocab, **params}, seed=seed)
    if name == "needle-text":
        lengths = int_list(args.context_lengths) or [args.seq_len or 200]
        depths = _floats(args.depths) or [0.5]
        return ds.needle_grid(lengths, depths, n_per_cell=n, seed=seed, unit="tokens", tokenizer=tok)
    if name == "ioi":
        return ds.ioi(n, seed=seed, tokenizer=tok)
    return _sentences_suite(n, seed)


def check_suite_ids(suite: Any, model: Any) -> None:
    """InputError when a suite item holds token ids outside the model's vocabulary (before any work starts)."""
    from ..probes.capture import _vocab_size

    vocab = _vocab_size(getattr(model.adapter, "module", None))
    if vocab is None or not hasattr(suite, "items"):
        return
    for index, item in enumerate(suite.items):
        for field in ("ids", "answer_ids", "corrupt_ids"):
            ids = getattr(item, field, None) or []
            bad = [i for i in ids if not 0 <= int(i) < vocab]
            if bad:
                raise InputError("suite token ids outside the model's vocabulary", expected=f"0 <= id < {vocab}",
                                 got=f"item {index} {field}: {bad[:3]}", fix="build the suite for this model's "
                                 "vocabulary (--vocab-size) or pick the model the suite was made for")


class PromptList(list):
    """Prompts of a text-to-image suite, with a name (what pipeline analyses such as ``hrv`` take)."""

    def __init__(self, name: str, prompts: list[str]):
        super().__init__(prompts)
        self.name, self.prompts = name, list(prompts)


def shapes_suite(model: Any, n_items: int, seed: int) -> Any:
    """Shapes for the model's family: VQA examples (VLMs) or scene captions (diffusion pipelines)."""
    from ..datasets.shapes import shapes_scenes
    from ..datasets.shapes_vlm_examples import ShapesVLMSuite

    family = model.info().family
    if family == "vlm":
        return ShapesVLMSuite(model, n_items=n_items, seed=seed)
    if family.startswith("diffusers-pipeline"):
        return PromptList(f"shapes captions(n={n_items}, seed={seed})",
                          [s.caption for s in shapes_scenes(n_items, seed=seed)])
    raise InputError("the shapes suite needs a VLM or a diffusion pipeline", expected="family vlm or "
                     "diffusers-pipeline", got=family, fix="use a text suite for text models")


def parse_concepts(spec: str | None) -> dict[str, list[str]] | None:
    """``red,green,circle`` (each word its own concept) or ``colour=red|green;shape=circle|square``."""
    if not spec:
        return None
    concepts: dict[str, list[str]] = {}
    for part in spec.replace(";", ",").split(",") if "=" not in spec else spec.split(";"):
        name, sep, words = part.partition("=")
        words_list = [w.strip() for w in (words if sep else name).split("|") if w.strip()]
        if not name.strip() or not words_list:
            raise InputError("malformed --concepts", expected="w1,w2 or name=w1|w2;name2=w3", got=spec)
        concepts[name.strip()] = words_list
    return concepts


def _default_concepts(args: argparse.Namespace) -> dict[str, list[str]] | None:
    if args.suite != "shapes":
        return None
    from ..datasets.shapes import COLORS, SHAPES

    return {w: [w] for w in (*COLORS, *SHAPES)}


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _options(fn: Any, args: argparse.Namespace, partial: Path | None) -> dict:
    """Keyword arguments for ``fn`` from the command line: only those it takes (explicitly or via **options)."""
    wanted = {"heads": args.heads, "batch_size": args.batch_size, "progress": not args.no_progress,
              "threshold": args.threshold, "template": args.template, "window": args.window,
              "n_sinks": int_list(args.n_sinks), "mode": args.mode, "partial": partial,
              "max_new_tokens": args.max_new_tokens,
              "concept_words": parse_concepts(args.concepts) or _default_concepts(args),
              "num_inference_steps": args.steps}
    params = inspect.signature(fn).parameters
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    # named parameters get what they name; **options get everything but the retrieval-only resume file
    out = {k: v for k, v in wanted.items() if v is not None and (k in params or (var_kw and k not in _NAMED_ONLY))}
    for spec in args.option or []:
        key, sep, value = spec.partition("=")
        if not sep or not key.strip():
            raise InputError("malformed --option", expected="KEY=VALUE", got=spec)
        out[key.strip().replace("-", "_")] = _literal(value.strip())
    return out


def _run_trace_analysis(analysis: Any, model: Any, suite: Any, options: dict) -> Any:
    from ..probes.capture import capture

    batch = next(suite.batches(len(suite), tokenizer=model.adapter.tokenizer))
    trace = capture(model, batch.inputs, patterns=True)
    return analysis.fn(trace, **{k: v for k, v in options.items() if k not in _UNIVERSAL})


def _head_label(row: Any) -> str:
    """``L3H5``, prefixed by the tower when it is not the text model's (``unet.up.1.L0H2``)."""
    tower = row.get("tower") if hasattr(row, "get") else None
    prefix = f"{tower}." if isinstance(tower, str) and tower and tower != "text" else ""
    return f"{prefix}L{int(row['layer'])}H{int(row['head'])}"


def print_table(table: Any, analysis: str, top: int, out=None) -> None:
    """The main metric's top heads (or, for model-level analyses, its rows), then summary rows."""
    out = out or sys.stdout
    import pandas as pd

    df = table.df
    metric = table.provenance.get("main_metric") or (df["metric"].iloc[0] if len(df) else "")
    rows = df[df["metric"] == metric]
    heads = rows[rows["head"] >= 0].sort_values("value", ascending=False).head(top)
    print(f"{analysis}: {metric} ({table.provenance.get('suite', '')}, model "
          f"{table.provenance.get('model', '?')})", file=out)
    if "concept" in rows and len(heads):  # per-concept analyses (hrv): each concept's top heads
        for concept, group in rows[rows["head"] >= 0].groupby("concept", sort=False):
            best = group.sort_values("value", ascending=False).head(3)
            print(f"  {concept:>10s}: " + ", ".join(f"{_head_label(r)} {r['value']:.3g}" for _, r in best.iterrows()),
                  file=out)
    elif len(heads):
        view = pd.DataFrame({"rank": range(1, len(heads) + 1),
                             "head": [_head_label(r) for _, r in heads.iterrows()],
                             metric: heads["value"].round(4).to_numpy()})
        print(view.to_string(index=False), file=out)
    else:
        cols = [c for c in ("setting", "n_sink", "window", "mode", "metric", "value", "n_targets") if c in df]
        print(df[cols].to_string(index=False), file=out)
    if "retrieval_heads" in table.provenance:
        print(f"retrieval heads (score > {table.provenance.get('threshold')}): "
              f"{table.provenance['retrieval_heads'] or 'none'} "
              f"[{table.provenance.get('n_counted')} of {table.provenance.get('n_samples')} samples counted]",
              file=out)
    means = df[(df["head"] == -1) & (df["layer"] >= 0) & df["metric"].str.startswith("layer_mean:")]
    if len(means):
        grid = means.pivot_table(index="layer", columns="metric", values="value").round(3)
        grid.columns = [c.split(":", 1)[1] for c in grid.columns]
        sinks = [c for c in grid.columns if c != "other"]
        grid["dominant"] = grid[sinks].idxmax(axis=1)
        print("mean sink score of each layer's heads:\n" + grid.to_string(), file=out)
    fractions = df[(df["layer"] == -1) & (df["head"] == -1) & df["metric"].str.startswith("sink_fraction")]
    for _, r in fractions.iterrows():
        print(f"{r['metric']} (> {r.get('threshold')}): {r['value']:.3f}", file=out)


def _score(args: argparse.Namespace) -> int:
    from ..circuits.registry import get_analysis, list_analyses
    from ..probes.loading import load

    if args.analysis == "list":
        for a in list_analyses():
            print(f"{a.name:22s} {a.description}")
        return 0
    if not args.model or not args.suite or not args.out:
        raise InputError("score needs --model, --suite and --out", expected="all three",
                         got={"model": args.model, "suite": args.suite, "out": args.out})
    from .._atomic import check_output

    out = check_output(args.out)
    analysis = get_analysis(args.analysis)
    model = load(args.model)
    suite = build_suite(args.suite, model, args)
    check_suite_ids(suite, model)
    partial = out.with_name(out.stem + ".partial.parquet")
    if args.restart and partial.is_file():
        partial.unlink()
    options = _options(analysis.fn, args, partial)
    try:
        table = (_run_trace_analysis(analysis, model, suite, options) if analysis.takes == "trace"
                 else analysis.fn(model, suite, **options))
    except TypeError as exc:
        raise AnalysisError(f"bad options for {args.analysis}", expected="options the analysis takes",
                            got=str(exc).splitlines()[0][:200], fix="check --option names") from None
    table.provenance.setdefault("model", args.model)
    table.provenance.setdefault("suite", suite.name)
    print_table(table, args.analysis, args.top)
    table.save(out)
    if partial.is_file():
        partial.unlink()
    print(f"wrote {out} ({len(table)} rows)")
    return 0


REFERENCE_DEFAULTS = """defaults and the papers' reference code (change them with --option KEY=VALUE):
  retrieval  span=answer: copies / length of the answer span, the reference's real_needle
             (nightdessert/Retrieval_Head); span=needle divides by the whole needle sentence.
             Decoding runs up to 50 tokens and stops only after a newline (never at EOS).
  induction, prev-token, duplicate
             normalise=rows: sum(A*P)/sum(A) over the rows the template covers;
             normalise=tl: over every row, exactly TransformerLens' detect_head (pattern's default).
  importance variant=abs_per_example (Michel et al.'s formula); abs_per_token is their repository's.
  hrv        the reference protocol of SNU-DRL/HRV (one seeded generator for all prompts, words re-sampled
             at every cross-attention call); see attnscope.circuits.hrv for the named alternatives.

examples:
  attnscope score list                                        # the analyses
  attnscope score sinks --model minilm --suite sentences --out sinks.parquet
  attnscope score induction --model zoo:induction-2l --suite induction --n-items 32 --out ind.parquet
  attnscope score retrieval --model zoo:recall-llama --suite recall --option span=needle --out r.parquet
  attnscope score visual-heads --model zoo:shapes-vlm --suite shapes --out vh.parquet
"""

USAGE = """attnscope score ANALYSIS --model MODEL --suite SUITE --out OUT [options]
       attnscope score list"""


def register(sub) -> None:
    p = sub.add_parser("score", help="score heads over a prompt suite (retrieval, sinks, induction, ...)",
                       epilog=REFERENCE_DEFAULTS, usage=USAGE,
                       description="Run an analysis over a prompt suite, print its top heads and write a "
                       "ResultTable.\n--model, --suite and --out are required (except for `attnscope score list`).")
    p.add_argument("analysis", help="a registered analysis (sinks, induction, prev-token, duplicate, retrieval, "
                   "pattern, streaming-llm, hrv, visual-heads, ...), or 'list' to list them all")
    p.add_argument("--model", help="minilm, zoo:NAME, a model folder or a hub name (required)")
    p.add_argument("--suite", help=f"{', '.join(SUITES)}, or a suite .json file (required)")
    p.add_argument("--out", help="results .parquet, checked before any work; resumes from OUT.partial.parquet "
                   "(required)")
    g = p.add_argument_group("suite options")
    g.add_argument("--n-items", type=int, default=16, help="items in the suite (needle-text: per grid cell)")
    g.add_argument("--seq-len", type=int, default=None, help="tokens per item (needle-text: context length)")
    g.add_argument("--vocab-size", type=int, default=None, help="vocabulary of a token suite (default: the model's "
                   "vocabulary)")
    g.add_argument("--seed", type=int, default=0, help="suite seed")
    g.add_argument("--context-lengths", help="needle-text: comma-separated token counts, e.g. 200,400")
    g.add_argument("--depths", help="needle-text: comma-separated depth fractions, e.g. 0.1,0.5,0.9")
    g.add_argument("--needle-len", type=int, default=4, help="needle: needle tokens")
    g = p.add_argument_group("analysis options")
    g.add_argument("--heads", help="restrict to heads, e.g. L1H*,L2H3 (default: all)")
    g.add_argument("--batch-size", type=int, default=None, help="items per forward pass (default: the "
                   "analysis' own)")
    g.add_argument("--threshold", type=float, default=None, help="retrieval 0.1, sinks 0.3 by default")
    g.add_argument("--max-new-tokens", type=int, default=None, help="retrieval: decode length")
    g.add_argument("--template", help="pattern: a .npy [query, key] template")
    g.add_argument("--window", type=int, default=None, help="streaming-llm: recent-token window")
    g.add_argument("--n-sinks", help="streaming-llm: kept initial tokens, e.g. 0,1,4")
    g.add_argument("--mode", choices=("recompute", "cache"), default=None, help="streaming-llm window mode (default: the analysis' own)")
    g.add_argument("--concepts", help="hrv: concepts, 'red,green,circle' or 'colour=red|green;shape=circle|square' "
                   "(default for --suite shapes: each colour and shape)")
    g.add_argument("--steps", type=int, default=None, help="diffusion analyses: denoising steps")
    g.add_argument("--option", action="append", help="any other analysis option, KEY=VALUE (repeatable)")
    g.add_argument("--top", type=int, default=10, help="heads to print")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--restart", action="store_true", help="ignore a partial result from an earlier run")
    p.set_defaults(run=_score)
