"""The ``attnscope`` command line. Bad input prints one line to stderr and exits 2 (``--debug`` for a traceback).

Commands live in ``attnscope.commands`` (one module per group).
"""

import argparse
import sys
from collections.abc import Sequence
from contextlib import nullcontext

from ._progress import heartbeat
from .errors import AttnscopeError


class OneLineParser(argparse.ArgumentParser):
    """argparse with the one-line error contract: a usage error prints ``attnscope CMD: error: ...`` (no usage
    block) and exits 2. Subcommand parsers inherit the class, and with it the shared help formatter (examples kept
    as written, defaults shown, required options marked)."""

    def __init__(self, *args, **kwargs):
        from .commands.parsing import HelpFormatter

        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        text = f"{self.prog}: error: {message} (see `{self.prog} --help`)".replace("\n", " ")
        self.exit(2, text + "\n")


# The top-level help lists the commands in these groups (a command in no group is listed under "other").
COMMAND_GROUPS = (
    ("look at a model", ("models", "info", "capture", "demo", "zoo")),
    ("attribute and score", ("attribute", "score", "heatmap")),
    ("intervene", ("ablate", "prune", "patch")),
    ("browse and scale", ("dash", "sweep", "remote-capture")),
)

EXAMPLES = """examples:
  attnscope models                                   # built-in models and zoo organisms (all work offline)
  attnscope capture --model minilm --text "Hello world" --stats sink,entropy --out trace.safetensors
  attnscope score induction --model zoo:induction-2l --suite induction --out ind.parquet
  attnscope ablate --model zoo:induction-2l --heads "L1H*" --suite induction --out ablate.parquet

`attnscope COMMAND --help` shows a command's options, defaults and examples.
"""


def package_version() -> str:
    """The installed distribution's version, else ``attnscope.__version__``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("attnscope")
    except PackageNotFoundError:
        from ._version import __version__

        return __version__


def _grouped_commands(sub: argparse._SubParsersAction) -> str:
    """The commands with their one-line help, in ``COMMAND_GROUPS``; clears argparse's own flat listing."""
    helps = {action.dest: action.help or "" for action in sub._choices_actions}
    sub._choices_actions.clear()  # argparse would list them again, ungrouped, under "positional arguments"
    grouped = [name for _, names in COMMAND_GROUPS for name in names]
    groups = [(title, [n for n in names if n in helps]) for title, names in COMMAND_GROUPS]
    groups.append(("other", [n for n in helps if n not in grouped]))
    width = max(map(len, helps), default=0) + 2
    lines = ["commands:"]
    for title, names in groups:
        if names:
            lines.append(f"  {title}:")
            lines += [f"    {name:{width}s}{helps[name]}" for name in names]
    return "\n".join(lines) + "\n\n"


def build_parser() -> argparse.ArgumentParser:
    from .commands import register_all

    parser = OneLineParser(prog="attnscope", description="Capture and analyse attention: capture patterns and "
                           "statistics,\nscore and attribute heads, intervene on them, browse the results.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}",
                        help="print the version and exit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="one of the commands below")
    register_all(sub)
    parser.epilog = _grouped_commands(sub) + EXAMPLES
    return parser


def _quiet_libraries() -> None:
    """Keep library warnings and progress bars off the one-line error contract.

    Imports nothing heavy (``attnscope models`` never loads transformers): a library already imported is quieted
    directly; one imported later reads the same settings from the environment when it loads."""
    import logging
    import os

    logging.getLogger("huggingface_hub").setLevel(logging.CRITICAL)
    transformers = sys.modules.get("transformers")
    if transformers is not None:
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        return
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"  # read by transformers' logging when it is first imported
    hub = sys.modules.get("huggingface_hub")
    if hub is not None:
        hub.utils.disable_progress_bars()  # transformers' bars start from the hub's setting
    else:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read by huggingface_hub when it is first imported


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # usage errors (one line, 2) and --help (0) return instead of leaving the process
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if not args.debug:
        _quiet_libraries()
    live = sys.stderr.isatty() and not args.debug  # a status line on a terminal only (never in logs or pipes)
    try:
        with heartbeat(sys.stderr) if live else nullcontext():
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
    except BrokenPipeError:  # `attnscope info ... | head`: the reader left; stop quietly, as Unix tools do
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141


if __name__ == "__main__":
    sys.exit(main())
