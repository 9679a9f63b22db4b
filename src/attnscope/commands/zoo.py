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


EXAMPLES = """examples:
  attnscope zoo list
  attnscope zoo train induction-2l --out zoo-retrained/induction-2l
  attnscope zoo train --all --out zoo-retrained          # every organism, one folder each
Use an organism as --model zoo:NAME (e.g. attnscope info --model zoo:induction-2l).
"""

TRAIN_EXAMPLES = """examples:
  attnscope zoo train induction-2l --out zoo-retrained/induction-2l
  attnscope zoo train induction-2l --seed 1 --out zoo-seed1/induction-2l
  attnscope zoo train --all --out zoo-retrained
Without --out the shipped checkpoints are overwritten.
"""


def register(sub) -> None:
    p = sub.add_parser("zoo", help="model organisms: list or retrain", epilog=EXAMPLES,
                       description="Small trained models with known mechanisms (induction, recall, shapes ...).")
    zsub = p.add_subparsers(dest="zoo_command", required=True, metavar="{list,train}",
                            help="list: the organisms; train: retrain one (or --all)")
    zsub.add_parser("list", help="list the organisms", description="List the zoo organisms, their architecture "
                    "and task.", epilog="example:\n  attnscope zoo list\n")
    zt = zsub.add_parser("train", help="retrain an organism from its card", epilog=TRAIN_EXAMPLES,
                         description="Retrain a zoo organism (or all of them) and write checkpoint and card.")
    zt.add_argument("name", nargs="?", help="organism to train (see `attnscope zoo list`); this or --all is "
                    "required")
    zt.add_argument("--all", action="store_true", help="train every organism (into OUT/NAME)")
    zt.add_argument("--out", default=None, help="output folder (default: overwrite the shipped checkpoint)")
    zt.add_argument("--seed", type=int, default=None, help="training seed (default: the organism's shipped seed)")
    p.set_defaults(run=_zoo)
