"""``attnscope sweep SPEC.yaml`` (a grid of cells on Ray) and ``attnscope remote-capture`` (one capture or
intervention plan in an nnsight trace on an NDIF-compatible backend).

The work is ``attnscope.sweeps`` (``load_spec``, ``run_sweep``) and ``attnscope.tasks.remote_capture_job``.
"""

import argparse
import sys

from ..errors import InputError
from ..tasks.references import ModelRef
from .parsing import check_text, parse_spans, parse_stats


def _remote_flag(args: argparse.Namespace) -> "bool | str | None":
    if args.remote and args.local_sim:
        raise InputError("--remote and --local-sim exclude each other", expected="one of them", got="both")
    return True if args.remote else "local" if args.local_sim else None


def _sweep(args: argparse.Namespace) -> int:
    from ..sweeps.runner import run_sweep
    from ..sweeps.spec import load_spec

    remote = _remote_flag(args)
    spec = load_spec(args.spec, device_map=args.device_map, max_memory=args.max_memory)
    report = run_sweep(spec, args.out, address=args.address, workers=args.workers, remote=remote,
                       progress=not args.quiet, verbose=args.verbose)
    print(report.summary())
    for cid, error in sorted(report.failed.items()):
        print(f"  failed cell={cid}: {error}", file=sys.stderr)
    return 0 if report.ok else 1


def remote_job_of(args: argparse.Namespace) -> "RemoteCaptureJob":  # noqa: F821 (imported when the command runs)
    """The ``RemoteCaptureJob`` of ``attnscope remote-capture``'s flags."""
    from ..probes.device_map import parse_device_map
    from ..probes.remote import plan_from_json
    from ..tasks.remote_capture_job import RemoteCaptureJob

    texts = [check_text(t, "--text") for t in args.text]
    stats, spans = parse_stats(args.stats)
    spans += parse_spans(args.mass_spans)
    plan = plan_from_json(args.plan) if args.plan else None
    device_map = parse_device_map(args.device_map) if args.local_sim else None
    options = {"heads": args.heads, "rows": args.rows, "stats": stats, "mass_spans": spans or [(0, 1)],
               "topk": args.topk}
    return RemoteCaptureJob(ModelRef.parse(args.model), texts, args.out, plan=plan, local_sim=args.local_sim,
                            device_map=device_map, task=args.task, options=options)


def _remote_capture(args: argparse.Namespace) -> int:
    from ..tasks.remote_capture_job import run_remote_capture_job

    job = remote_job_of(args)
    trace, path = run_remote_capture_job(job)
    where = trace.provenance.get("remote", {}).get("host", "local simulation")
    print(f"captured {len(trace.sites)} sites through nnsight ({where}) -> {path}")
    return 0


SWEEP_EXAMPLES = """a minimal spec (sweep.yaml):
  name: sinks-vs-ablation
  models: [zoo:induction-2l]
  suites: [{generator: induction, n_items: 8}]
  analyses: [head-stats, sinks]
  interventions: [none, {heads: "L0H1", mode: zero}]

examples:
  attnscope sweep sweep.yaml --workers 2                     # local Ray instance, results/sweeps/<name>
  attnscope sweep sweep.yaml --out results/sweep --workers 4
  attnscope sweep sweep.yaml --out results/sweep --address HOST:6379   # join a running cluster
Read the results in Python with attnscope.sweeps.load_sweep("results/sweep").
"""

REMOTE_EXAMPLES = """examples:
  attnscope remote-capture --model minilm --local-sim --text "Hello world" --stats sink,entropy --out r.safetensors
  attnscope remote-capture --model minilm --local-sim --text "Hello world" --plan plan.json --out p.safetensors
  attnscope remote-capture --model meta-llama/Llama-3.1-8B --text "Hello world" --stats sink --out l.safetensors
Without --local-sim the backend is ATTNSCOPE_NNSIGHT_HOST (else NDIF_HOST) with the key NDIF_API_KEY.
A plan is the JSON of InterventionPlan.to_dict, e.g. from
  attnscope ablate --model minilm --heads L1H0 --save-plan plan.json
"""


def register(sub) -> None:
    p = sub.add_parser("sweep", help="run a grid of models x suites x analyses x interventions on Ray",
                       epilog=SWEEP_EXAMPLES,
                       description="Run every cell of a sweep spec as a Ray task, one folder of a parquet dataset "
                       "per cell.\nCells already in --out are skipped: rerun the same command to resume.")
    p.add_argument("spec", help="the sweep spec (YAML)")
    p.add_argument("--out", default=None, help="results folder (default results/sweeps/<name>)")
    p.add_argument("--address", default=None, help="join this Ray cluster (auto, HOST:6379, ray://HOST:10001); "
                   "default: a local Ray instance for this run")
    p.add_argument("--workers", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--remote", action="store_true", help="captures run on the NDIF backend "
                   "(ATTNSCOPE_NNSIGHT_HOST or NDIF_HOST, NDIF_API_KEY)")
    p.add_argument("--local-sim", action="store_true", help="like --remote, through nnsight's local simulation")
    p.add_argument("--device-map", default=None, help="for models without one: auto, balanced, sequential, a "
                   "device, or a JSON map {module: device|disk}")
    p.add_argument("--max-memory", default=None, help="per device, e.g. 0=20GiB,cpu=60GiB")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="show Ray's and the workers' logs")
    p.set_defaults(run=_sweep)

    p = sub.add_parser("remote-capture", help="capture (and apply an intervention plan) in an nnsight trace on "
                       "an NDIF-compatible backend", epilog=REMOTE_EXAMPLES,
                       description="Capture attention (statistics or patterns) through nnsight on a remote "
                       "backend, or locally with --local-sim.")
    p.add_argument("--model", required=True, help="hub id the backend serves (with --local-sim: any model)")
    p.add_argument("--text", required=True, action="append", help="input text (repeat for a batch)")
    p.add_argument("--plan", default=None, help="intervention plan JSON (InterventionPlan.to_dict), a file or "
                   "inline")
    p.add_argument("--heads", help="only these heads, e.g. L3H5,L7H* (default: all)")
    p.add_argument("--rows", help="only these query rows: last:K, first:K, A:B (default: all)")
    p.add_argument("--stats", help="streaming statistics: sink,mass,entropy,topk")
    p.add_argument("--mass-spans", help="key spans for mass, e.g. 0:1,5:9 (default with --stats mass: 0:1)")
    p.add_argument("--topk", type=int, default=5, help="k of the topk statistic")
    p.add_argument("--local-sim", action="store_true", help="serialise the request as for the backend but run "
                   "it here (no network)")
    p.add_argument("--device-map", default=None, help="with --local-sim: how to place the local model")
    p.add_argument("--task", default=None, help="nnsight task of the remote model (default: inferred; "
                   "text-generation when it cannot be)")
    p.add_argument("--out", required=True, help="trace file to write (.safetensors; checked before any work)")
    p.set_defaults(run=_remote_capture)
