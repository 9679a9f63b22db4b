"""Model cards: ``card.json`` (machine-readable) and ``MODEL_CARD.md`` (rendered from it)."""

import json
from pathlib import Path
from typing import Any

CARD_FORMAT = "attnscope.zoo_card/1"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value) or "-"
    return str(value)


def _scores_table(scores: dict[str, dict[str, float]]) -> list[str]:
    metrics = list(scores)
    heads = list(next(iter(scores.values())).keys()) if scores else []
    lines = ["| head | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for head in heads:
        lines.append(f"| {head} | " + " | ".join(f"{scores[m][head]:.3f}" for m in metrics) + " |")
    return lines


def _ablation_lines(name: str, ab: dict[str, Any]) -> list[str]:
    return [f"**{name}** ({ab.get('metric', 'metric')}; chance {_fmt(ab.get('chance'))}):", "",
            f"- clean: {_fmt(ab['clean'])}",
            f"- key heads {_fmt(ab['key_heads'])} zero-ablated: **{_fmt(ab['key_ablated'])}**",
            f"- {len(ab['key_heads'])} random other heads zero-ablated ({ab['n_random_draws']} draws): mean "
            f"{_fmt(ab['random_ablated_mean'])}, min {_fmt(ab['random_ablated_min'])}, "
            f"max {_fmt(ab['random_ablated_max'])}", ""]


def render_markdown(card: dict[str, Any]) -> str:
    arch, train, ev = card["architecture"], card["training"], card["evaluation"]
    lines = [f"# {card['name']}", "", card["description"], "",
             "## Task", "", card["task"], "", f"Data: `attnscope.datasets.{card['data']['generator']}` with "
             f"`{json.dumps(card['data']['params'])}`.", "",
             "## Architecture", "", f"`{arch['class']}` ({arch['parameters']:,} parameters): " +
             ", ".join(f"{k}={v}" for k, v in arch.items() if k not in ("class", "parameters")), "",
             "## Training", "", f"Seed {card['seed']}, {train['steps']} steps, batch {train['batch_size']}, "
             f"lr {train['lr']}, {train['time_s']} s on {train['device']} ({train['threads']} thread). "
             f"Reproduce: `attnscope.zoo.train({card['name']!r}, out_dir=..., seed={card['seed']})`.", "",
             "## Held-out evaluation", "", f"{ev['metric']}: **{_fmt(ev['value'])}** on {ev['n_items']} items "
             f"generated with seed {ev['seed']} (chance {_fmt(ev.get('chance'))}).", "",
             "## Ground-truth heads", ""]
    for role, heads in card["ground_truth_heads"].items():
        rule = card.get("ground_truth_rules", {}).get(role, "")
        lines.append(f"- **{role}**: {_fmt(heads)}" + (f" ({rule})" if rule else ""))
    lines += ["", "Per-head scores:", ""] + _scores_table(card["head_scores"]) + ["", "## Ablation", ""]
    for name, ab in card["ablation"].items():
        lines += _ablation_lines(name, ab)
    if card.get("sink_removal"):
        sr = card["sink_removal"]
        lines += ["## Sink removal", "", sr["description"] + ":", "",
                  "| setting | " + " | ".join(sr["clean"]) + " |", "|---|" + "---|" * len(sr["clean"]),
                  "| clean | " + " | ".join(_fmt(v) for v in sr["clean"].values()) + " |",
                  "| BOS hidden | " + " | ".join(_fmt(v) for v in sr["bos_hidden"].values()) + " |", ""]
    if card.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in card["notes"]] + [""]
    return "\n".join(lines)


def write_card(out_dir: Path, card: dict[str, Any]) -> None:
    card = {"format": CARD_FORMAT, **card}
    Path(out_dir, "card.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    Path(out_dir, "MODEL_CARD.md").write_text(render_markdown(card), encoding="utf-8")


def read_card(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))
