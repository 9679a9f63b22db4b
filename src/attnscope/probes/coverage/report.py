"""Writing the coverage matrix: ``coverage.json`` (the results) and ``docs/architectures.md`` (a table rendered
from the JSON alone, so the two cannot disagree). Both are deterministic: rows in catalogue order, cells in
column order, reasons without addresses or unrounded numbers."""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..._extras import require

RESULTS_PATH = Path(__file__).resolve().parents[1] / "coverage.json"
REPO_ROOT = Path(__file__).resolve().parents[4]
DOCS_PATH = REPO_ROOT / "docs" / "architectures.md"
SYMBOLS = {"pass": "✓", "fail": "✗", "unsupported": "—"}
COLUMN_HELP = {
    "capture": "`attnscope.capture` runs and records every site the adapter lists, one record per site, with finite "
               "`[batch, head, query, key]` probabilities",
    "patterns": "captured probabilities equal an independent reference within 1e-5: the model's own weights "
                "(`output_attentions=True` under `attn_implementation=\"eager\"`) where it returns them, else the "
                "adapter's `reference_patterns` (the *Reference* column says which)",
    "validate": "`attnscope.probes.validate(model)` reports ok",
    "statistics": "streaming entropy, span mass and top-k from `capture(stats=...)` equal `statistics_from_probs` "
                  "of the reference weights within 1e-5",
    "outputs": "model outputs are bit-identical with and without capture, and every attention implementation "
               "(or diffusers processor) is unchanged afterwards",
    "zero": "`apply_plan` equals a reference edit written without attnscope: a test-only attention function "
            "(`AttentionInterface.register(\"coverage_ref\", ...)`) that calls the module's own "
            "`eager_attention_forward` and zeroes the head's slice `out[:, :, h]` (diffusers models: the edited "
            "module's SDPA call replaced by `softmax(q k^T * scale + mask) @ v`, then the same edit)",
    "rescale": "as *zero*, the slice multiplied by 3",
    "mean": "as *zero*, the slice replaced by a given mean vector (the head's mean output on another input)",
    "resample": "as *zero*, the slice replaced by the same head's output recorded on a reference token sequence",
    "uniform": "as *zero*, the head recomputed as `softmax(0 + mask) @ V` (uniform over the allowed keys)",
    "steer": "as *zero*, a seeded random vector added to the head's slice at every position",
}


def status(cell: str) -> str:
    return cell.split(":", 1)[0]


def dumps(matrix: dict[str, Any]) -> str:
    return json.dumps(matrix, indent=1, ensure_ascii=False) + "\n"


def build_matrix(names: list[str], check_row: Callable[[str], dict], columns: tuple[str, ...],
                 progress: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    import torch
    import transformers


    diffusers = require("diffusers", "diffusion")

    rows = {}
    for name in names:
        rows[name] = check_row(name)
        failing = sum(status(c) != "pass" for c in rows[name]["columns"].values())
        progress(f"{name:18s} {rows[name]['kind']:16s} {len(columns) - failing}/{len(columns)} pass")
    return {"format": "attnscope.coverage/1", "columns": list(columns),
            "generated_with": {"torch": torch.__version__, "transformers": transformers.__version__,
                               "diffusers": diffusers.__version__},
            "architectures": rows}


def _escape(text: str) -> str:
    return "`" + text.replace("`", "'").replace("|", "/") + "`"


def counts(matrix: dict[str, Any]) -> dict[str, dict[str, int]]:
    """column -> {pass, fail, unsupported} counts."""
    out = {c: {"pass": 0, "fail": 0, "unsupported": 0} for c in matrix["columns"]}
    for row in matrix["architectures"].values():
        for column, cell in row["columns"].items():
            out[column][status(cell)] += 1
    return out


def render_markdown(matrix: dict[str, Any]) -> str:
    """``docs/architectures.md`` from the matrix."""
    columns = matrix["columns"]
    notes: dict[str, int] = {}
    lines = ["| Architecture | Kind | Class | Reference | " + " | ".join(columns) + " |",
             "|" + "---|" * (4 + len(columns))]
    for name, row in matrix["architectures"].items():
        cells = []
        for column in columns:
            cell = row["columns"][column]
            mark = SYMBOLS[status(cell)]
            if status(cell) != "pass":
                mark += f"[^{notes.setdefault(cell, len(notes) + 1)}]"
            cells.append(mark)
        cls = row["class"].rsplit(".", 1)[-1]
        lines.append(f"| {name} | {row['kind']} | `{cls}` | {row['patterns_reference']} | " + " | ".join(cells) + " |")
    tally = counts(matrix)
    summary = ["| Check | ✓ pass | ✗ fail | — unsupported |", "|---|---|---|---|"]
    summary += [f"| {c} | {tally[c]['pass']} | {tally[c]['fail']} | {tally[c]['unsupported']} |" for c in columns]
    versions = ", ".join(f"{k} {v}" for k, v in matrix["generated_with"].items())
    head = [
        "# Architecture coverage",
        "",
        "<!-- Generated by `python -m attnscope.probes.coverage --write` from "
        "src/attnscope/probes/coverage.json; do not edit by hand. -->",
        "",
        f"Which architectures attnscope captures, validates and edits correctly: {len(matrix['architectures'])} "
        f"architectures, each checked on a tiny seeded random-init model (about 2 layers x 4 heads, width 32, "
        f"every parameter perturbed so no term is zero) with {versions}. "
        "`tests/integration/test_coverage_matrix.py` re-runs every check and fails when a result differs from "
        "this table: a regression or an improvement is a diff to regenerate. `attnscope info --model M` prints "
        "the row of M's architecture.",
        "",
        "✓ pass, ✗ fail, — unsupported (attnscope refuses with an explicit error). Footnotes give the reasons. "
        "*Reference* is what the *patterns* and *statistics* columns compared against: `model` (the model's own "
        "eager weights), `adapter` (the adapter's independent reference path), `model+adapter`, or `none`.",
        "",
    ]
    help_lines = ["## Checks", ""] + [f"- **{c}**: {COLUMN_HELP.get(c, '')}." for c in columns] + [
        "",
        "Interventions edit head 0 of layer 0 and the last head of the last self-attention layer (as "
        "`output_projections` numbers them; encoder-decoders: encoder layers first; LLaVA-class VLMs: the language "
        "model's layers, then the vision tower's, so the last layer edited is a vision layer). `apply_plan` runs "
        "on the "
        "model's own attention kernel (SDPA), the reference on eager attention (or attention from its "
        "definition); outputs are compared within atol 1e-5 x the output's scale (max |x|, at least 1) plus "
        "rtol 1e-5, wherever the two kernels agree without any edit (they may differ on padded rows whose keys "
        "are all masked). A reference edit must move the outputs by at least 1e-4, or the check is inconclusive.",
        "",
    ]
    foot = ["## Reasons", ""] + [f"[^{n}]: {_escape(cell)}" for cell, n in notes.items()]
    return "\n".join(head + lines + [""] + ["## Summary", ""] + summary + [""] + help_lines + foot) + "\n"


def write(matrix: dict[str, Any], results: Path = RESULTS_PATH, docs: Path | None = DOCS_PATH) -> list[Path]:
    results.write_text(dumps(matrix), encoding="utf-8")
    written = [results]
    if docs is not None:
        docs.parent.mkdir(parents=True, exist_ok=True)
        docs.write_text(render_markdown(matrix), encoding="utf-8")
        written.append(docs)
    return written
