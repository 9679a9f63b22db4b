"""``attnscope patch``: activation patching of every head between clean and corrupted inputs, or its estimates.

Methods (``METHODS``): ``exact`` (one patched forward per head and pair, batched), ``atp``, ``atp*`` (AtP*,
Kramar et al. 2024) and ``atp-qk``; ``verify_top`` re-checks the top estimates exactly. The pairs come from a suite
that has them (``PAIR_SUITES`` or a suite file with corrupted twins) or from a JSON file (``load_pairs``).
``run_patch_job`` checks the output path (before any work), loads the model, patches and writes the table.

Example:
    >>> import tempfile, pathlib
    >>> from attnscope.tasks.patch_job import PatchRequest, run_patch_job
    >>> from attnscope.tasks.references import ModelRef, SuiteRef
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "exact.parquet"
    >>> request = PatchRequest(ModelRef.parse("zoo:induction-2l"), out, SuiteRef.parse("induction"), n_items=4,
    ...                        progress=False)
    >>> result = run_patch_job(request)
    >>> result.path == out, result.table.provenance["model"], result.table.df.layer.nunique()
    (True, 'zoo:induction-2l', 2)
    >>> print(result.summary(top=1).splitlines()[0])
    activation_patching: logit (noise), model zoo:induction-2l, pairs induction (corrupted: fresh random tokens)
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._progress import stage
from .._atomic import check_output
from ..circuits.patch_pairs import PatchPairs
from ..circuits.verified_patching import patching_analysis
from ..errors import InputError
from ..results import ResultTable
from .models import load_ref
from .references import ModelRef, SuiteRef
from .suites import build_suite

METHODS = ("exact", "atp", "atp*", "atp-qk")
PAIR_SUITES = ("ioi", "induction", "recall")


@dataclass(frozen=True)
class PatchRequest:
    """The model, where the table goes, the pairs (``suite`` with ``n_items``, ``seed`` and ``suite_params``, or a
    ``pairs`` JSON file), and the patching options of ``attnscope.circuits.verified_patching.patching_analysis``
    (``heads``: a head spec such as ``L1H*``, passed on as written)."""

    model: ModelRef
    out: "Path | str"
    suite: SuiteRef | None = None
    pairs: "Path | str | None" = None
    method: str = "exact"
    direction: str = "noise"
    metric: str | None = None
    granularity: str = "head"
    normalize: bool = False
    verify_top: int = 0
    random_controls: int = 10
    heads: str | None = None
    n_items: int = 16
    seed: int = 0
    suite_params: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 16
    progress: bool = True


@dataclass
class PatchResult:
    """The table and where it went."""

    table: ResultTable
    path: Path

    def summary(self, top: int = 10) -> str:
        """What ``attnscope patch`` prints: the ``top`` heads and where the table went."""
        return f"{patch_summary(self.table, top)}\nwrote {self.path} ({len(self.table)} rows)"


def run_patch_job(request: PatchRequest) -> PatchResult:
    """Check the output path and the pairs' source, load the model, patch, write the table."""
    out = check_output(request.out)
    suite_ref = request.suite
    if suite_ref is None and request.pairs is None:
        raise InputError("patch needs pairs", expected="--suite ioi|induction|recall|FILE.json or --pairs FILE.json",
                         got=None)
    if suite_ref is not None and suite_ref.name not in PAIR_SUITES and not suite_ref.path:
        raise InputError("no clean/corrupted pairs for this suite", expected=list(PAIR_SUITES) + ["FILE.json"],
                         got=suite_ref.name, fix="use --pairs FILE.json for your own pairs")
    model = load_ref(request.model)
    pairs = load_pairs(request.pairs) if request.pairs is not None else None
    suite = (build_suite(suite_ref, model, n_items=request.n_items, seed=request.seed, **request.suite_params)
             if suite_ref is not None else None)
    stage(f"patching ({request.method})")
    table = patching_analysis(model, suite, method=request.method, direction=request.direction,
                              metric=request.metric, granularity=request.granularity, normalize=request.normalize,
                              verify_top=request.verify_top, n_random=request.random_controls,
                              batch_size=request.batch_size, seed=request.seed, heads=request.heads,
                              progress=request.progress, pairs=pairs)
    table.provenance["model"] = str(request.model)
    table.save(out)
    return PatchResult(table, out)


def load_pairs(path: "Path | str") -> PatchPairs:
    """``PatchPairs`` from a JSON list of ``{"clean", "corrupt", "answers", "wrong"?, "positions"?}`` objects."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InputError("cannot read the pairs file", expected="a JSON list of pair objects",
                         got=f"{path} ({type(exc).__name__})") from None
    if not isinstance(data, list) or not data or not all(isinstance(d, dict) for d in data):
        raise InputError("malformed pairs file", expected='[{"clean": [...], "corrupt": [...], "answers": [...]}]',
                         got=type(data).__name__)
    missing = [i for i, d in enumerate(data) if not {"clean", "corrupt", "answers"} <= set(d)]
    if missing:
        raise InputError("pair without clean, corrupt or answers", expected="all three keys", got=f"pair {missing[0]}")
    wrong = [d["wrong"] for d in data] if all("wrong" in d for d in data) else None
    positions = [d.get("positions", [len(d["clean"]) - 1]) for d in data]
    return PatchPairs.from_ids([d["clean"] for d in data], [d["corrupt"] for d in data],
                               answers=[d["answers"] for d in data], wrong=wrong, positions=positions,
                               name=Path(path).name)


def _label(row: dict) -> str:
    pos = int(row.get("position", -1))
    kind = "KV" if row.get("unit") == "kv_head" else "H"
    return f"L{int(row['layer'])}{kind}{int(row['head'])}" + (f"@{pos}" if pos >= 0 else "")


def patch_summary(table: ResultTable, top: int = 10) -> str:
    """What ``attnscope patch`` prints: the largest effects, or the verified top-k with their exact values."""
    df = table.df[table.df["head"] >= 0]
    prov = table.provenance
    lines = [f"{prov.get('analysis')}: {prov.get('metric')} ({prov.get('direction')}), model {prov.get('model')}, "
             f"pairs {prov.get('suite')}"]
    if "role" in df:  # verified top-k: estimate and exact side by side, by rank of the estimate
        rows = df[df["method"] != "exact"].sort_values("rank").head(top)
        for row in rows.to_dict("records"):
            exact = f"exact {row['exact']:+.4g}" if row["verified"] else "not verified"
            lines.append(f"  {_label(row):12s} {row['method']} estimate {row['value']:+.4g}   {exact}  ({row['role']})")
        lines.append(f"unverified heads above |effect| {prov['threshold']:.3g}: fraction <= "
                     f"{prov['false_negative_rate_upper']:.3f} ({prov['confidence']:.0%} Clopper-Pearson upper bound "
                     f"from {prov['n_random']} random controls)")
        return "\n".join(lines)
    shown = df.assign(size=df["value"].abs()).sort_values("size", ascending=False).head(top)
    for row in shown.to_dict("records"):
        kind = "estimate" if row["is_estimate"] else "exact"
        lines.append(f"  {_label(row):12s} {row['value']:+.4g}  [{row['method']}, {kind}]")
    return "\n".join(lines)
