"""The main job: capture attention of the real MiniLM on built-in sentences, summarise it, write results.

Example:
    >>> from attnscope.tasks.demo import run_demo
    >>> import tempfile
    >>> summary = run_demo(tempfile.mkdtemp(), quiet=True)
    >>> round(float(summary.loc[2, "mass:[CLS]"]), 1) >= 0.4
    True
"""

import os
import shlex
from pathlib import Path

import pandas as pd

from ..circuits.token_mass import special_token_mass
from ..probes.capturing import capture
from .models import load_model

DEMO_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Attention heads route information between tokens.",
    "A retrieval head copies the needle from a long context.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
]


def run_demo(out_dir: str | Path = "results/demo", model_name: str = "minilm", quiet: bool = False) -> pd.DataFrame:
    """Capture patterns and streaming statistics, print a per-layer summary, save trace and ResultTable."""
    out = Path(out_dir)
    model = load_model(model_name)
    trace = capture(model, DEMO_SENTENCES, stats=("entropy",), patterns=True)
    table = special_token_mass(trace)
    entropy = trace.stat("entropy")  # [layer, batch, head, query]
    per_layer = table.df.pivot_table(index="layer", columns="metric", values="value", aggfunc="mean")
    per_layer["entropy (nats)"] = entropy.mean(dim=(1, 2, 3)).numpy()
    trace_path = trace.save(out / "trace.safetensors")
    table_path = table.save(out / "special_token_mass.parquet")
    if not quiet:
        info = model.info()
        tower = info.tower()
        print(f"attnscope demo: {model.name} ({tower.n_layers} layers x {tower.n_heads} heads, "
              f"attention path {trace.provenance['attention_path']}), {len(DEMO_SENTENCES)} sentences\n")
        print("mean attention mass on special tokens, and mean entropy, per layer:")
        print(per_layer.round(3).to_string())
        top = table.top(5, metric="mass:[CLS]")
        print("\nheads with the most mass on [CLS]: "
              + ", ".join(f"L{r.layer}H{r.head}={r.value:.2f}" for r in top.itertuples()))
        print(f"\nwrote {trace_path} and {table_path}")
        print(f"\nexplore the results in the dashboard (http://127.0.0.1:8050/):\n"
              f"  {_attnscope_command()} dash --results {shlex.quote(str(out))} --model {shlex.quote(model_name)}")
    return per_layer


def _attnscope_command() -> str:
    """``attnscope`` if that is on PATH and is this installation, else the path of this environment's script."""
    import shutil
    import sys

    script = Path(sys.executable).parent / "attnscope"
    on_path = shutil.which("attnscope")
    if on_path and Path(on_path).resolve() == script.resolve() or not script.exists():
        return "attnscope"
    return os.path.relpath(script) if not os.path.relpath(script).startswith("..") else str(script)
