"""Small parsers shared by CLI commands, and the help formatter every command's parser uses."""

import argparse

from ..errors import InputError


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
