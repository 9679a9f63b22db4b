"""The CLI teaches: ``--version``, a grouped top-level help, examples and defaults in every command's help, a help
text for every option, choices for enumerations, examples (in the help and the README) that parse, and
``ablate --out``. Everything runs in this process (``attnscope.cli.main``)."""

import argparse
import re
import shlex
from importlib.metadata import version
from pathlib import Path

import pytest

from attnscope.cli import build_parser, main

README = Path(__file__).resolve().parents[2] / "README.md"


def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) of every parser in the tree, the top level first."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, path + (name,))


PARSERS = dict(_parsers(build_parser()))
COMMANDS = [path for path in PARSERS if path]


def _options(parser: argparse.ArgumentParser):
    return [a for a in parser._actions
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def _help(capsys, path) -> str:
    assert main([*path, "--help"]) == 0
    return capsys.readouterr().out


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_version_prints_the_package_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"attnscope {version('attnscope')}"


def test_top_level_help_groups_the_commands_and_has_examples(capsys):
    out = _help(capsys, ())
    assert len(out.splitlines()) <= 50, "the top-level help should fit one screen"
    assert "commands:" in out and "examples:" in out and "--version" in out
    listed = re.findall(r"^    (\S+) ", out, flags=re.M)
    assert sorted(listed) == sorted(p[0] for p in COMMANDS if len(p) == 1)  # every command, once


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_every_command_help_has_examples_and_defaults(path, capsys):
    out = _help(capsys, path)
    assert "example" in out.lower()
    flat = _flat(out)
    for action in _options(PARSERS[path]):
        default = action.default
        if default is None or isinstance(default, bool) or default is argparse.SUPPRESS:
            continue
        if "default" in (action.help or "").lower():
            continue  # the help text names its default itself
        assert f"(default: {default})" in flat, (action.option_strings, out)
    formatter = PARSERS[path]._get_formatter()
    for action in _options(PARSERS[path]):
        if action.required and action.option_strings:  # said in the help, not only in the usage line
            assert "required" in formatter._get_help_string(action), action.option_strings


def test_every_option_has_a_help_text():
    missing = [(" ".join(("attnscope",) + path), action.option_strings or action.dest)
               for path, parser in PARSERS.items() for action in _options(parser)
               if not (action.help or "").strip()]
    assert not missing, missing


def test_enumerated_options_have_choices():
    enumerations = {("attribute", "--method"), ("attribute", "--head-fusion"), ("ablate", "--mode"),
                    ("ablate", "--select"), ("ablate", "--metric"), ("prune", "--variant"), ("prune", "--importance"),
                    ("prune", "--granularity"), ("patch", "--method"), ("patch", "--direction"),
                    ("patch", "--granularity"), ("score", "--mode"), ("heatmap", "--preset")}
    for command, option in enumerations:
        action = PARSERS[(command,)]._option_string_actions[option]
        assert action.choices, (command, option)
    assert list(PARSERS[("attribute",)]._option_string_actions["--method"].choices)[:3] == \
        ["rollout", "flow", "relevance"]


@pytest.mark.parametrize("args,needle", [
    (["attribute", "--model", "minilm", "--text", "hi", "--method", "bogus", "--out", "a.parquet"],
     "unknown attribution method"),
    (["attribute", "--model", "minilm", "--text", "hi", "--method", "rollout|flow|relevance", "--out", "a.parquet"],
     "choose from rollout, flow, relevance"),
    (["attribute", "--model", "minilm", "--text", "hi", "--head-fusion", "median", "--out", "a.parquet"],
     "invalid choice"),
    (["ablate", "--model", "zoo:induction-2l", "--heads", "L1H0", "--mode", "explode"], "invalid choice"),
])
def test_bad_choices_print_one_line_and_exit_2(args, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("attnscope ") and ": error: " in lines[0], captured.err
    assert needle in lines[0] and not captured.out
    assert not list(tmp_path.iterdir())


def _command_lines(text: str) -> list[str]:
    """``attnscope ...`` lines of ``text``, backslash continuations joined, comments and pipes dropped."""
    out, current = [], None
    for raw in text.splitlines():
        line = raw.strip()
        if current is not None:
            current += " " + line
        elif line.startswith("attnscope "):
            current = line
        else:
            continue
        if current.endswith("\\"):
            current = current[:-1]
            continue
        out.append(current)
        current = None
    return out


def _argv(line: str) -> list[str]:
    words = shlex.split(line, comments=True)
    assert words[0] == "attnscope"
    for stop in ("|", "&&", ";", ">"):
        if stop in words:
            words = words[:words.index(stop)]
    return words[1:]


def _parses(line: str) -> None:
    parser = build_parser()
    try:
        args = parser.parse_args(_argv(line))
    except SystemExit as exc:
        pytest.fail(f"example does not parse ({exc.code}): {line}")
    assert callable(args.run)


@pytest.mark.parametrize("path", [p for p in PARSERS if p], ids=" ".join)
def test_help_examples_parse(path, capsys):
    lines = [ln for ln in _command_lines(_help(capsys, path)) if ln.split()[1:2] == [path[0]]]
    assert lines, f"no runnable example in `attnscope {' '.join(path)} --help`"
    for line in _command_lines(_help(capsys, path)):
        _parses(line)


def test_readme_cli_lines_parse():
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    lines = [ln for block in blocks for ln in _command_lines(block)]
    assert len(lines) >= 15
    for line in lines:
        assert "rollout|" not in line, line
        _parses(line)


def test_ablate_out_writes_a_parquet_table(tmp_path, capsys):
    import attnscope

    out = tmp_path / "sub" / "ablate.parquet"
    assert main(["ablate", "--model", "zoo:induction-2l", "--heads", "L1H*", "--suite", "induction", "--n", "8",
                 "--batch-size", "8", "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    table = attnscope.ResultTable.load(out)
    df = table.df.set_index("setting")
    assert list(df.index) == ["before", "after", "delta"]
    assert set(df["analysis"]) == {"ablate"} and set(df["layer"]) == {-1} and set(df["head"]) == {-1}
    assert df.loc["delta", "value"] == pytest.approx(df.loc["after", "value"] - df.loc["before", "value"])
    assert df["heads"].iloc[0] == "L1H0,L1H1,L1H2,L1H3" and df["mode"].iloc[0] == "zero"
    assert table.provenance["model"] == "zoo:induction-2l" and table.provenance["n_items"] == 8


@pytest.mark.parametrize("out,needle", [("{tmp}", "directory"), ("{tmp}/a.csv", "unknown output format")])
def test_ablate_out_is_checked_before_any_work(out, needle, tmp_path, capsys):
    rc = main(["ablate", "--model", "/no/such/model", "--heads", "L0H0", "--out", out.format(tmp=tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and needle in err, err  # not the missing model: --out first


def test_a_closed_pipe_ends_quietly():
    """`attnscope info ... | head -1`: the reader leaves early; no BrokenPipeError traceback."""
    import os
    import subprocess
    import sys

    cli = os.path.join(os.path.dirname(sys.executable), "attnscope")
    run = subprocess.run(f"'{cli}' info --model minilm | head -1", shell=True, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert run.stdout.startswith("model:") and "Traceback" not in run.stderr and "BrokenPipe" not in run.stderr
