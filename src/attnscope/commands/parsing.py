"""Small parsers shared by CLI commands."""

from ..errors import InputError


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
            raise InputError("unknown statistic", expected="sink, mass, entropy, topk", got=name)
        if name not in names:
            names.append(name)
    return tuple(names), spans


def parse_spans(spec: str | None) -> list[tuple[int, int]]:
    """``0:1,5:9`` -> [(0, 1), (5, 9)]."""
    if not spec:
        return []
    spans = []
    for part in spec.split(","):
        try:
            a, b = part.split(":")
            spans.append((int(a), int(b)))
        except ValueError:
            raise InputError("malformed key span", expected="START:END[,START:END]", got=part) from None
    return spans


def int_list(spec: str | None, what: str = "integers") -> list[int] | None:
    """``200,400`` -> [200, 400]; None or empty -> None."""
    if not spec:
        return None
    try:
        return [int(v) for v in spec.split(",")]
    except ValueError:
        raise InputError(f"malformed list of {what}", expected="comma-separated integers, e.g. 0,2", got=spec) from None
