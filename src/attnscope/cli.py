"""The ``attnscope`` command line. Bad input prints one line to stderr and exits 2 (``--debug`` for a traceback).

Commands live in ``attnscope.commands`` (one module per group).
"""

import argparse
import sys
from collections.abc import Sequence

from .errors import AttnscopeError


class OneLineParser(argparse.ArgumentParser):
    """argparse with the one-line error contract: a usage error prints ``attnscope CMD: error: ...`` (no usage
    block) and exits 2. Subcommand parsers inherit the class."""

    def error(self, message: str):  # type: ignore[override]
        text = f"{self.prog}: error: {message} (see `{self.prog} --help`)".replace("\n", " ")
        self.exit(2, text + "\n")


def build_parser() -> argparse.ArgumentParser:
    from .commands import register_all

    parser = OneLineParser(prog="attnscope", description="Capture and analyse attention.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    register_all(sub)
    return parser


def _quiet_libraries() -> None:
    """Keep library warnings and progress bars off the one-line error contract."""
    import logging

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("huggingface_hub").setLevel(logging.CRITICAL)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # usage errors (one line, 2) and --help (0) return instead of leaving the process
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if not args.debug:
        _quiet_libraries()
    try:
        return int(args.run(args))
    except AttnscopeError as exc:
        if args.debug:
            raise
        print(f"attnscope: error: {exc}".replace("\n", " ").replace("\r", " "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not break the clean-up (Ray's atexit)
        print("attnscope: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
