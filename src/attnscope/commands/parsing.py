"""Small parsers shared by CLI commands, and the help formatter every command's parser uses."""

import argparse
import ast
from typing import Any

from ..errors import InputError
from ..tasks.references import ModelRef


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs (the examples) kept as written; every option's default shown, and required
    options marked, after its help text.

    A default is left out where it says nothing (None, or False/True of a flag) and where the help text already
    speaks of its default; ``(required)`` is added to options argparse requires.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required and action.option_strings and "required" not in text.lower():
            return text + " (required)"
        if (action.default is None or isinstance(action.default, bool) or action.default is argparse.SUPPRESS
                or "default" in text.lower() or "%(default)" in text):
            return text
        return super()._get_help_string(action)


def one_of(values: tuple[str, ...] | list[str], what: str):
    """An argparse ``type`` that refuses anything but ``values`` with ``unknown WHAT 'x' (choose from ...)``
    (use together with ``choices=values``, which lists them in the help)."""

    def check(value: str) -> str:
        if value not in values:
            raise argparse.ArgumentTypeError(f"unknown {what} {value!r} (choose from {', '.join(values)})")
        return value

    check.__name__ = what.replace(" ", "_")
    return check


def parse_stats(spec: str | None) -> tuple[tuple[str, ...], list[tuple[int, int]]]:
    """``sink,entropy,topk,mass`` -> statistic names and the key spans ``mass`` refers to (sink = position 0)."""
    if not spec:
        return (), []
    names: list[str] = []
    spans: list[tuple[int, int]] = []
    for raw in spec.split(","):
        name = raw.strip()
        if name == "sink":
            spans.append((0, 1))
            name = "mass"
        if name not in ("mass", "entropy", "topk"):
            raise InputError("unknown statistic", expected="sink, mass, entropy, topk", got=name,
                             fix="e.g. --stats sink,entropy")
        if name not in names:
            names.append(name)
    return tuple(names), spans


def parse_spans(spec: str | None) -> list[tuple[int, int]]:
    """``0:1,5:9`` -> [(0, 1), (5, 9)] (half-open, ``0 <= START < END``)."""
    if not spec:
        return []
    spans = []
    for part in spec.split(","):
        try:
            a, b = part.split(":")
            span = (int(a), int(b))
        except ValueError:
            raise InputError("malformed key span", expected="START:END[,START:END]", got=part,
                             fix="e.g. --mass-spans 0:1,5:9") from None
        if not 0 <= span[0] < span[1]:
            raise InputError("empty or negative key span", expected="0 <= START < END", got=part,
                             fix="e.g. --mass-spans 0:1 (keys 0 up to, not including, 1)")
        spans.append(span)
    return spans


def int_list(spec: str | None, what: str = "integers") -> list[int] | None:
    """``200,400`` -> [200, 400]; None or empty -> None."""
    if not spec:
        return None
    try:
        return [int(v) for v in spec.split(",")]
    except ValueError:
        raise InputError(f"malformed list of {what}", expected="comma-separated integers, e.g. 0,2", got=spec,
                         fix="write integers separated by commas, no spaces") from None


def check_text(text: str, option: str = "--text") -> str:
    """``text`` unless it is empty or not valid UTF-8 (undecodable command-line bytes arrive as surrogates)."""
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"empty {option}", expected="some text", got=repr(text), fix=f"pass {option} 'a sentence'")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"{option} is not valid UTF-8", expected="UTF-8 text",
                         got=f"undecodable {text[exc.start:exc.end]!r} at character {exc.start}",
                         fix="re-encode the text as UTF-8 (e.g. iconv -t UTF-8)") from None
    return text


def float_list(spec: str | None) -> list[float] | None:
    if not spec:
        return None
    try:
        return [float(v) for v in spec.split(",")]
    except ValueError:
        raise InputError("malformed number list", expected="e.g. 0.1,0.5,0.9", got=spec) from None


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


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_options(specs: list[str] | None) -> dict[str, Any]:
    """``--option KEY=VALUE`` (repeatable) -> ``{key: literal value}``."""
    out = {}
    for spec in specs or []:
        key, sep, value = spec.partition("=")
        if not sep or not key.strip():
            raise InputError("malformed --option", expected="KEY=VALUE", got=spec)
        out[key.strip().replace("-", "_")] = _literal(value.strip())
    return out


def parse_suite_args(spec: str | None) -> dict[str, Any]:
    """``--suite-args seq_len=32,vocab_size=64`` -> generator keyword arguments (ints, floats, strings or None)."""
    out: dict[str, Any] = {}
    for part in filter(None, (spec or "").split(",")):
        if "=" not in part:
            raise InputError("malformed suite argument", expected="KEY=VALUE[,KEY=VALUE]", got=part)
        k, v = part.split("=", 1)
        for cast in (int, float):
            try:
                out[k.strip()] = cast(v)
                break
            except ValueError:
                continue
        else:
            out[k.strip()] = None if v.strip().lower() == "none" else v.strip()
    return out


def suite_params(args: argparse.Namespace) -> dict[str, Any]:
    """The suite flags the user set, as generator parameters (``--context-lengths`` / ``--depths`` are the
    needle-text grid's ``lengths`` / ``depths``, in tokens)."""
    for option in ("n_items", "seq_len", "vocab_size", "needle_len"):
        value = getattr(args, option, None)
        if value is not None and value < 1:
            raise InputError(f"--{option.replace('_', '-')} must be positive", expected=">= 1", got=value,
                             fix=f"e.g. --{option.replace('_', '-')} 16")
    params: dict[str, Any] = {k: v for k, v in (("vocab_size", args.vocab_size), ("seq_len", args.seq_len))
                              if v is not None}
    if args.suite == "needle" and getattr(args, "needle_len", None) is not None:  # patch has no needle flags
        params["needle_len"] = args.needle_len
    if args.suite == "needle-text":
        params.update(lengths=int_list(getattr(args, "context_lengths", None)) or [args.seq_len or 200],
                      depths=float_list(getattr(args, "depths", None)) or [0.5], unit="tokens")
        params.pop("seq_len", None)
    if args.suite == "recall":
        params.pop("seq_len", None)
    return params


def token_id_batch(rows: list[str]) -> "torch.Tensor":  # noqa: F821 (torch is imported lazily)
    """``["5,17,3", "6,2,9"]`` -> a ``[batch, seq]`` id tensor (rows must be equally long)."""
    import torch

    ids = [int_list(row, "token ids") or [] for row in rows]
    if any(len(r) != len(ids[0]) for r in ids) or not ids[0]:
        raise InputError("token id rows must be non-empty and equally long", expected=f"{len(ids[0])} ids per row",
                         got=[len(r) for r in ids], fix="pad the rows yourself, or capture them one at a time")
    return torch.tensor(ids)


def capture_job_of(args: argparse.Namespace) -> "CaptureJob":  # noqa: F821 (imported when the command runs)
    """The ``CaptureJob`` of ``attnscope capture``'s flags (every string parsed here, at the edge)."""
    from ..tasks.capture_job import CaptureJob

    stats, spans = parse_stats(args.stats)
    spans += parse_spans(args.mass_spans)
    inputs = [check_text(t, "--text") for t in args.text] if args.text else token_id_batch(args.ids)
    options = {"heads": args.heads, "rows": args.rows, "stats": stats, "mass_spans": spans or [(0, 1)],
               "topk": args.topk, "patterns": True if args.patterns else None,
               "implementation": "eager" if args.eager else "auto"}
    return CaptureJob(ModelRef.parse(args.model), inputs, args.out, options)
