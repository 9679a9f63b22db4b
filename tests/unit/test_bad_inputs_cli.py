"""Bad input to every CLI command: exit code 2, exactly one line on stderr (``attnscope...: error: ...``), no
traceback, and nothing left behind (no output, no temporary file, no input touched).

The CLI runs in this process (``attnscope.cli.main``), so a case costs what its command does before it refuses,
not a Python start-up. ``{in}`` in an argument is the folder of malformed inputs (``bad_inputs.make_inputs``);
outputs are relative to a fresh working folder per case. Models: the real MiniLM (text, tokenizer) and the zoo's
tokenizer-less ``induction-2l`` (vocabulary 128).
"""

import socket

import pytest
from bad_inputs import left_behind, make_inputs, snapshot

from attnscope.cli import main

M, Z = "minilm", "zoo:induction-2l"
BAD_TEXT = "caf\udce9 au lait"  # what Python makes of non-UTF-8 bytes on the command line
T = ["--text", "Paris is the capital of France."]


def _cap(*extra, model=M, out="o.safetensors"):
    return ["capture", "--model", model, *(T if model == M and "--ids" not in extra and "--text" not in extra
                                           else []), *extra, "--out", out]


def _ids(*extra, ids="5,17,3,9", out="o.safetensors"):
    return ["capture", "--model", Z, f"--ids={ids}", *extra, "--out", out]


def _attr(*extra, out="a.parquet"):
    return ["attribute", "--model", M, *(T if "--text" not in extra else []), *extra, "--out", out]


def _score(analysis="sinks", *extra, model=M, suite="sentences", out="s.parquet"):
    return ["score", analysis, "--model", model, "--suite", suite, "--n-items", "2", "--no-progress", *extra,
            "--out", out]


def _ablate(*extra, heads="L0H1"):
    return ["ablate", "--model", Z, "--heads", heads, "--n", "4", *extra]


def _prune(out, *extra):
    return ["prune", "--model", Z, "--n", "4", *extra, "--out", out]


def _heat(*extra, out="h.png", word="circle"):
    return ["heatmap", "--model", "zoo:shapes-diffusion", "--prompt", "red circle left", "--word", word,
            "--steps", "1", *extra, "--out", out]


def _sweep(spec, *extra):
    return ["sweep", spec, *extra]


def _remote(*extra, out="r.safetensors"):
    return ["remote-capture", "--model", M, "--local-sim", *(T if "--text" not in extra else []), *extra,
            "--out", out]


CASES = [
    # --- argparse: usage errors are one line too ------------------------------------------------------------------
    ([], "required"),
    (["no-such-command"], "invalid choice"),
    (["capture"], "required"),
    (["models", "extra"], "unrecognized arguments"),
    (_cap("--topk", "x"), "invalid int value"),
    (_attr("--head-fusion", "median"), "invalid choice"),
    (["score", "sinks", "--n-items", "abc"], "invalid int value"),
    (["dash", "--results", ".", "--port", "http"], "invalid int value"),
    (["zoo"], "required"),
    (["zoo", "bogus"], "invalid choice"),
    (_cap("--mass-spans", "-1:2"), "expected one argument"),
    (["capture", "--model", M, "--text", "a", "--ids", "1", "--out", "o"], "not allowed with"),
    (_ablate("--mode", "explode"), "invalid choice"),
    (_heat("--preset", "other"), "invalid choice"),
    # --- info ---------------------------------------------------------------------------------------------------------
    (["info", "--model", "/no/such/dir"], "model path does not exist"),
    (["info", "--model", "zoo:no-such-organism"], "no-such-organism"),
    (["info", "--model", "{in}/afile"], "not a model directory"),
    (["info", "--model", "{in}/model_noconfig"], "not a model directory"),
    (["info", "--model", "{in}/model_badtype"], "cannot load the model"),
    (["info", "--model", "{in}/model_badjson"], "cannot load the model"),
    (["info", "--model", "{in}/model_nonutf8"], "cannot load the model"),
    (["info", "--model", ""], "model"),
    (["info", "--model", "./a/b/c"], "model path does not exist"),
    # --- capture: --out is checked before anything runs ---------------------------------------------------------
    (_cap(out="{in}/adir"), "output path is a directory"),
    (_cap(out=""), "empty output path"),
    (_cap(out="   "), "empty output path"),
    (_cap(out="{in}/afile/x.safetensors"), "output path is under a file"),
    (_cap(out="{in}/afile/deeper/x.safetensors"), "output path is under a file"),
    (_cap(out="/proc/x.safetensors"), "not writable"),
    (_cap(out="sub/"), "names a folder"),
    (_cap(out="."), "output path is a directory"),
    (_ids(out="{in}/adir"), "output path is a directory"),
    # token ids
    (_ids(ids="1,999"), "outside the vocabulary"),
    (_ids(ids="-1,2"), "outside the vocabulary"),
    (_ids(ids="1,,2"), "malformed list of token ids"),
    (_ids(ids="a,b"), "malformed list of token ids"),
    (_ids(ids="1.5,2"), "malformed list of token ids"),
    (_ids("--ids", "6"), "equally long"),
    (_ids(ids=""), "non-empty"),
    (_ids(ids="1," * 300 + "1"), "tokens"),  # longer than the context
    # text
    (["capture", "--model", Z, "--text", "hi", "--out", "o.safetensors"], "--ids"),
    (_cap("--text", BAD_TEXT), "not valid UTF-8"),
    (_cap("--text", ""), "empty --text"),
    (_cap("--text", "   "), "empty --text"),
    (_cap("--text", "word " * 600), "<= 512 tokens"),
    # heads, rows, statistics, spans
    (_cap("--heads", "L1Q2"), "malformed head spec"),
    (_cap("--heads", "L6H0"), "layer < 6"),
    (_cap("--heads", "L0H99"), "head < 12"),
    (_cap("--heads", "L1H1,"), "malformed head spec"),
    (_cap("--heads", ""), "empty head spec"),
    (_cap("--rows", "5:2"), "empty row selection"),
    (_cap("--rows", "3:3"), "empty row selection"),
    (_cap("--rows", "last:0"), "empty row selection"),
    (_cap("--rows", "first:0"), "empty row selection"),
    (_cap("--rows", "10:20"), "outside the input"),
    (_cap("--rows", "500:"), "outside the input"),
    (_cap("--rows", "abc"), "malformed row spec"),
    (_cap("--rows=-1:2"), "malformed row spec"),
    (_cap("--stats", "bogus"), "unknown statistic"),
    (_cap("--stats", "sink,,entropy"), "unknown statistic"),
    (_cap("--stats", "mass", "--mass-spans", "5:2"), "empty or negative key span"),
    (_cap("--stats", "mass", "--mass-spans=-1:2"), "empty or negative key span"),
    (_cap("--stats", "mass", "--mass-spans", "3:3"), "empty or negative key span"),
    (_cap("--stats", "mass", "--mass-spans", "50:60"), "mass span beyond the keys"),
    (_cap("--stats", "mass", "--mass-spans", "x:y"), "malformed key span"),
    (_cap("--stats", "mass", "--mass-spans", "1"), "malformed key span"),
    (_cap("--stats", "topk", "--topk", "0"), "topk must be a positive integer"),
    (_cap("--topk=-3"), "topk must be a positive integer"),
    (["capture", "--model", "/no/such/model", "--text", "hi", "--out", "o.safetensors"], "does not exist"),
    # --- attribute -------------------------------------------------------------------------------------------------
    (_attr("--position", "999"), "--position out of range"),
    (_attr("--position=-999"), "--position out of range"),
    (_attr("--method", "relevance", "--position", "999"), "position out of range"),
    (_attr("--method", "relevance", "--target", "999999"), "a target needs a model with logits"),
    (_attr("--layer", "99"), "layer out of range"),
    (_attr("--method", "bogus"), "unknown attribution method"),
    (_attr(out="{in}/adir"), "output path is a directory"),
    (_attr(out="{in}/afile/a.parquet"), "under a file"),
    (_attr(out=""), "empty output path"),
    (_attr("--text", BAD_TEXT), "not valid UTF-8"),
    (_attr("--text", ""), "empty --text"),
    (["attribute", "--model", "zoo:nope", *T, "--out", "a.parquet"], "nope"),
    # --- score -----------------------------------------------------------------------------------------------------
    (["score", "no-such-analysis", "--model", M, "--suite", "sentences", "--out", "s.parquet"], "unknown analysis"),
    (["score", "sinks", "--model", M, "--suite", "sentences"], "score needs --model, --suite and --out"),
    (["score", "sinks", "--suite", "sentences", "--out", "s.parquet"], "score needs --model, --suite and --out"),
    (_score(suite="no-such-suite"), "unknown suite"),
    (_score(suite="{in}/bad.json"), "not UTF-8"),
    (_score(suite="{in}/noname.json"), "incomplete prompt suite"),
    (_score(suite="{in}/noitems.json"), "incomplete prompt suite"),
    (_score(suite="{in}/itemsdict.json"), "incomplete prompt suite"),
    (_score(suite="{in}/notjson.json"), "not valid JSON"),
    (_score(suite="{in}/deep.json"), "not valid JSON"),
    (_score(suite="{in}/list.json"), "not an attnscope prompt suite"),
    (_score(suite="{in}/wrongformat.json"), "not an attnscope prompt suite"),
    (_score(suite="{in}/unknownfield.json"), "unknown prompt item fields"),
    (_score(suite="{in}/noidsnotext.json"), "needs ids or text"),
    (_score(suite="{in}/badids.json"), "sequence of token ids"),
    (_score(suite="{in}/missing.json"), "suite file not found"),
    (_score("induction", model=Z, suite="{in}/outofvocab.json"), "outside the model's vocabulary"),
    (_score("induction", "--vocab-size", "100000", model=Z, suite="induction"), "larger than the model's vocabulary"),
    (_score("induction", "--vocab-size", "0", model=Z, suite="induction"), "--vocab-size must be positive"),
    (_score("induction", "--seq-len=-4", model=Z, suite="induction"), "--seq-len must be positive"),
    (_score("induction", "--n-items", "0", model=Z, suite="induction"), "--n-items must be positive"),
    (_score(model=Z, suite="sentences"), "the model has no tokenizer"),
    (_score(suite="shapes"), "the shapes suite needs a VLM or a diffusion pipeline"),
    (_score("pattern"), "needs a template"),
    (_score("pattern", "--template", "{in}/bad.npy"), "not a readable .npy template"),
    (_score("pattern", "--template", "{in}/object.npy"), "not a readable .npy template"),
    (_score("pattern", "--template", "{in}/missing.npy"), "template file not found"),
    (_score("pattern", "--template", "{in}/cube.npy"), "square"),
    (_score("pattern", "--template", "{in}/rect.npy"), "square"),
    (_score("pattern", "--template", "{in}/strings.npy"), "finite numeric array"),
    (_score("pattern", "--template", "{in}/nan.npy"), "finite numeric array"),
    (_score("sinks", "--option", "novalue"), "malformed --option"),
    (_score("sinks", "--option", "no_such_option=1"), "unknown options for sinks"),
    (_score("sinks", "--heads", "L9H0"), "layer < 6"),
    (_score(out="{in}/adir"), "output path is a directory"),
    (_score(out="{in}/afile/s.parquet"), "under a file"),
    (_score("retrieval", "--context-lengths", "a,b", suite="needle-text"), "malformed list"),
    (_score("retrieval", "--depths", "x", suite="needle-text"), "malformed number list"),
    (_score("hrv", "--concepts", "=", suite="sentences"), "malformed --concepts"),
    # --- ablate ----------------------------------------------------------------------------------------------------
    (_ablate(heads="L9H0"), "layer index out of range"),
    (_ablate(heads="bogus"), "malformed head spec"),
    (_ablate(heads=""), "empty head spec"),
    (_ablate("--suite", "no-such-suite"), "suite"),
    (_ablate("--suite", "{in}/bad.json"), "not UTF-8"),
    (_ablate("--suite", "{in}/noname.json"), "incomplete prompt suite"),
    (_ablate("--suite-args", "novalue"), "malformed suite argument"),
    (_ablate("--mode", "rescale"), "rescale needs a scale"),
    (_ablate("--save-plan", "{in}/adir"), "output path is a directory"),
    (_ablate("--save-plan", "{in}/afile/p.json"), "under a file"),
    (["ablate", "--model", "/no/such/model", "--heads", "L0H0"], "does not exist"),
    # --- prune -----------------------------------------------------------------------------------------------------
    (_prune("{in}/afile"), "output folder is a file"),
    (_prune("{in}/afile/sub"), "under a file"),
    (_prune(""), "empty output path"),
    (_prune("{in}/prune_badjson"), "pruning state is not valid JSON"),
    (_prune("{in}/prune_nonutf8"), "not UTF-8"),
    (_prune("{in}/prune_list"), "malformed pruning state"),
    (_prune("{in}/prune_nosteps"), "malformed pruning state"),
    (_prune("{in}/prune_other"), "pruning run with other options"),
    (_prune("p", "--suite", "no-such-suite"), "suite"),
    # --- heatmap ---------------------------------------------------------------------------------------------------
    (_heat(out="h.txt"), "unknown output format"),
    (_heat(out="{in}/adir"), "output path is a directory"),
    (_heat(out="{in}/afile/h.png"), "under a file"),
    (_heat(word=","), "no word given"),
    (_heat("--prompt", BAD_TEXT), "not valid UTF-8"),
    (_heat("--heads", "a"), "malformed list of heads"),
    (["heatmap", "--model", "/no/such/model", "--prompt", "p", "--word", "w", "--out", "h.png"], "does not exist"),
    # --- dash ------------------------------------------------------------------------------------------------------
    (["dash", "--results", "{in}/no-such-dir"], "results directory not found"),
    (["dash", "--results", "{in}/afile"], "results directory not found"),
    (["dash", "--results", "{in}", "--port", "99999"], "port out of range"),
    (["dash", "--results", "{in}", "--port", "0"], "port out of range"),
    (["dash", "--results", "{in}", "--port=-1"], "port out of range"),
    (["dash", "--results", "{in}", "--host", "999.1.1.1"], "unknown host"),
    (["dash", "--results", "{in}", "--host", "no-such-host.invalid"], "unknown host"),
    (["dash", "--results", "{in}", "--host", "192.0.2.123"], "cannot listen on this address"),
    (["dash", "--results", "{in}", "--port", "{busy}"], "port in use"),
    # --- sweep -----------------------------------------------------------------------------------------------------
    (_sweep("{in}/no-such.yaml"), "sweep spec not found"),
    (_sweep("{in}/adir"), "sweep spec not found"),
    (_sweep("{in}/bad.yaml"), "not UTF-8"),
    (_sweep("{in}/spec_invalid.yaml"), "not valid YAML"),
    (_sweep("{in}/deep.yaml"), "not valid YAML"),
    (_sweep("{in}/spec_list.yaml"), "a sweep spec is a mapping"),
    (_sweep("{in}/spec_dotdot.yaml"), "name must be one plain folder name"),
    (_sweep("{in}/spec_slash.yaml"), "name must be one plain folder name"),
    (_sweep("{in}/spec_hidden.yaml"), "name must be one plain folder name"),
    (_sweep("{in}/spec_unknown_key.yaml"), "colour"),
    (_sweep("{in}/spec_no_models.yaml"), "models"),
    (_sweep("{in}/spec_bad_analysis.yaml"), "unknown analysis"),
    (_sweep("{in}/spec_bad_generator.yaml"), "unknown suite generator"),
    (_sweep("{in}/spec_bad_seed.yaml"), "seed must be an integer"),
    (_sweep("{in}/spec_bad_retries.yaml"), "max_retries"),
    (_sweep("{in}/spec_bad_memory.yaml"), "memory"),
    (_sweep("{in}/spec_bad_heads.yaml"), "head spec"),
    (_sweep("{in}/spec_bad_mode.yaml"), "mode"),
    (_sweep("{in}/spec_bad_import.yaml"), "cannot import plugin module"),
    (_sweep("{in}/spec_ok.yaml", "--workers", "0"), "bad worker count"),
    (_sweep("{in}/spec_ok.yaml", "--workers=-2"), "bad worker count"),
    (_sweep("{in}/spec_ok.yaml", "--out", "{in}/afile"), "output folder is a file"),
    (_sweep("{in}/spec_ok.yaml", "--out", "{in}/afile/sub"), "under a file"),
    (_sweep("{in}/spec_ok.yaml", "--out", "/proc/sweep"), "not writable"),
    (_sweep("{in}/spec_ok.yaml", "--remote", "--local-sim", "--out", "sw"), "exclude each other"),
    # --- remote-capture --------------------------------------------------------------------------------------------
    (_remote("--plan", "{in}/bad_plan.json"), "not UTF-8"),
    (_remote("--plan", "{in}/notjson.json"), "not valid JSON"),
    (_remote("--plan", "{in}/plan_list.json"), "not a JSON object"),
    (_remote("--plan", "{in}/plan_format.json"), "not an intervention plan"),
    (_remote("--plan", "{in}/plan_nomode.json"), "malformed intervention plan"),
    (_remote("--plan", "{in}/missing_plan.json"), "intervention plan not found"),
    (_remote("--plan", "{not json"), "not valid JSON"),
    (_remote("--text", BAD_TEXT), "not valid UTF-8"),
    (_remote("--rows", "5:2"), "empty row selection"),
    (_remote(out="{in}/adir"), "output path is a directory"),
    # --- patch -----------------------------------------------------------------------------------------------------
    (["patch", "--model", Z, "--suite", "induction", "--out", "{in}/adir"], "directory"),
    (["patch", "--model", Z, "--suite", "induction", "--out", "{in}/afile/p.parquet"], "under a file"),
    (["patch", "--model", Z, "--out", "p.parquet"], "patch needs pairs"),
    (["patch", "--model", Z, "--suite", "sentences", "--out", "p.parquet"], "no clean/corrupted pairs"),
    (["patch", "--model", Z, "--pairs", "{in}/notjson.json", "--out", "p.parquet"], "cannot read the pairs file"),
    (["patch", "--model", Z, "--pairs", "{in}/bad.json", "--out", "p.parquet"], "pairs file"),
    (["patch", "--model", Z, "--pairs", "{in}/list.json", "--out", "p.parquet"], "malformed pairs file"),
    (["patch", "--model", Z, "--suite", "induction", "--method", "nope", "--out", "p.parquet"], "invalid choice"),
    # --- zoo, demo, models -----------------------------------------------------------------------------------------
    (["zoo", "train"], "zoo train needs a name or --all"),
    (["zoo", "train", "no-such-organism", "--out", "z"], "no-such-organism"),
    (["zoo", "train", "induction-2l", "--out", "{in}/afile"], "output folder is a file"),
    (["demo", "--out", "{in}/afile"], "output folder is a file"),
    (["demo", "--out", "{in}/afile/sub"], "under a file"),
    (["demo", "--out", "d", "--model", "zoo:nope"], "nope"),
    (["models", "--bogus"], "unrecognized arguments"),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("bad-inputs"))


@pytest.fixture(scope="module")
def busy_port():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield str(listener.getsockname()[1])


def _ids_of(case):
    args = case[0]
    return " ".join(a if len(a) < 24 else a[:20] + "..." for a in args)[:90] or "(no arguments)"


@pytest.mark.parametrize("args,needle", CASES, ids=[_ids_of(c) for c in CASES])
def test_bad_cli_input_is_one_line_and_exit_2(args, needle, inputs, busy_port, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = [a.replace("{in}", str(inputs)).replace("{busy}", busy_port) for a in args]
    before = snapshot(inputs, tmp_path)
    rc = main(args)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert rc == 2, err[-2000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert lines[0].startswith("attnscope") and ": error: " in lines[0], lines[0]
    assert needle in lines[0], lines[0]
    assert not left_behind(before, snapshot(inputs, tmp_path))


def test_battery_covers_every_command():
    from attnscope.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)
    tested = {args[0] for args, _ in CASES if args}
    assert commands <= tested, sorted(commands - tested)
