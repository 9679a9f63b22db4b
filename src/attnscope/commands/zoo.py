"""``attnscope zoo list | train NAME | train --all``."""

import argparse

from ..errors import InputError


def _zoo(args: argparse.Namespace) -> int:
    from .. import zoo

    if args.zoo_command == "list":
        for organism in zoo.list_organisms():
            print(f"{organism['name']:16s} {organism.get('architecture', '')}  {organism.get('task', '')}")
        return 0
    if not args.all and not args.name:
        raise InputError("zoo train needs a name or --all", expected="NAME or --all", got="nothing",
                         fix="e.g. `attnscope zoo train induction-2l --out DIR`")
    if args.out is not None:
        from .._atomic import check_output

        check_output(args.out, folder=True)
    result = zoo.train_all(args.out) if args.all else zoo.train(args.name, out_dir=args.out, seed=args.seed)
    for path in result if isinstance(result, (list, tuple)) else [result]:
        print(f"trained -> {path}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("zoo", help="model organisms: list or retrain")
    zsub = p.add_subparsers(dest="zoo_command", required=True)
    zsub.add_parser("list")
    zt = zsub.add_parser("train")
    zt.add_argument("name", nargs="?")
    zt.add_argument("--all", action="store_true")
    zt.add_argument("--out", default=None)
    zt.add_argument("--seed", type=int, default=None)
    p.set_defaults(run=_zoo)
