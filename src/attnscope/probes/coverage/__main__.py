"""``python -m attnscope.probes.coverage [--write] [--only NAME ...]``: run the coverage checks.

Without ``--write`` it prints each row and exits 1 when a row differs from the shipped ``coverage.json``; with
``--write`` it regenerates ``attnscope/probes/coverage.json`` and ``docs/architectures.md``.
"""

import argparse
import sys
import warnings


def main(argv: list[str] | None = None) -> int:
    from . import ARCHITECTURES, COLUMNS, check_row, load_matrix
    from .report import DOCS_PATH, REPO_ROOT, build_matrix, write

    parser = argparse.ArgumentParser(prog="python -m attnscope.probes.coverage", description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="regenerate coverage.json and docs/architectures.md")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="check only these architectures (not with --write)")
    args = parser.parse_args(argv)
    if args.write and args.only:
        parser.error("--write regenerates the whole matrix: drop --only")
    names = args.only or list(ARCHITECTURES)
    unknown = [n for n in names if n not in ARCHITECTURES]
    if unknown:
        parser.error(f"unknown architecture(s) {unknown}; known: {', '.join(ARCHITECTURES)}")
    warnings.filterwarnings("ignore")
    from transformers.utils import logging

    logging.set_verbosity_error()
    matrix = build_matrix(names, check_row, COLUMNS, progress=print)
    if args.write:
        docs = DOCS_PATH if (REPO_ROOT / "pyproject.toml").is_file() else None
        for path in write(matrix, docs=docs):
            print(f"wrote {path}")
        return 0
    shipped = load_matrix()["architectures"]
    changed = [n for n in names if shipped.get(n) != matrix["architectures"][n]]
    for name in changed:
        print(f"{name}: differs from the shipped coverage.json: {matrix['architectures'][name]['columns']}")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
