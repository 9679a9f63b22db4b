"""``attnscope dash --results DIR [--model M] [--host 127.0.0.1] [--port 8050]``: the dashboard."""

import argparse


def _dash(args: argparse.Namespace) -> int:
    from ..dashboards.app import check_bind, serve
    from ..dashboards.files import ResultsRoot

    ResultsRoot(args.results)  # a missing directory is bad input: one line, exit 2, before any model is loaded
    check_bind(args.host, args.port)  # as is an address that cannot be served (before "serving ..." is printed)
    serve(args.results, model=args.model, host=args.host, port=args.port)
    return 0


EXAMPLES = """examples:
  attnscope demo --out results/demo               # something to browse
  attnscope dash --results results/demo --model minilm   # Live tab: /?tab=live
  attnscope dash --results results/demo --port 8060
  attnscope dash --results results/demo --model path/to/vit   # a saved vision encoder: image in, no text
Open the printed address in a browser; Ctrl-C stops the server.
"""


def register(sub) -> None:
    from ..dashboards.app import DEFAULT_HOST, DEFAULT_PORT

    p = sub.add_parser("dash", help="dashboard: browse result files; Live tab: type text and see its attention",
                       epilog=EXAMPLES, description="Serve a Dash app over a results folder: head grids, attention "
                       "patterns, (with --model) an ablation panel, and a Live tab that captures typed text and "
                       "draws the model view, head view, pattern, QK embedding, attribution and long-sequence view.")
    p.add_argument("--results", required=True, help="results directory (e.g. results/demo); only its result "
                   "files (.parquet, .safetensors, .json) are read")
    p.add_argument("--model", help="model of the Live tab (type, capture, see) and the ablation panel, e.g. minilm "
                   "or a model folder (a saved vision encoder such as ViT / DINOv2 takes an image; default: the Live "
                   "tab offers minilm and the zoo; no ablation panel)")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"interface to bind (default {DEFAULT_HOST}: this machine "
                   "only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to serve on")
    p.set_defaults(run=_dash)
