"""Bad input to the public Python API: an ``AttnscopeError`` subclass naming what was expected, what was got and
the fix (never a KeyError, ValueError, UnicodeDecodeError ... from inside), and nothing left behind on disk.

Each case is ``(name, call, error class)``; ``call(ctx)`` gets a namespace with a tiny GPT-2 (vocabulary 64, 2 layers
x 4 heads), the real MiniLM, a small trace and table, the folder of malformed inputs (``bad_inputs.make_inputs``)
and a fresh working folder.
"""

import json
import types

import pandas as pd
import pytest
import torch
from bad_inputs import left_behind, make_inputs, snapshot
from tiny_models import tiny_text_model

import attnscope
from attnscope import (AnalysisError, AttentionTrace, AttnscopeError, CaptureError, CorruptResultError, HeadSet,
                       HeadSpecError, InputError, InputTooLongError, ModelNotFoundError, OutputError, ResultTable,
                       Site, SiteError)
from attnscope.datasets import PromptItem, PromptSuite

IDS = torch.tensor([[1, 2, 3, 4, 5]])


def _cap(ctx, inputs=None, **kwargs):
    return attnscope.capture(ctx.gpt2, IDS if inputs is None else inputs, **kwargs)


def _sweep_spec(**changes):
    from attnscope.sweeps import parse_spec

    base = {"models": ["minilm"], "suites": [{"generator": "induction", "n_items": 2, "seq_len": 8,
                                              "vocab_size": 32}], "analyses": ["head-stats"]}
    return parse_spec(dict(base, **changes))


def _run_sweep(ctx, **kwargs):
    from attnscope.sweeps import run_sweep

    spec = {"models": ["minilm"], "suites": [{"generator": "induction", "n_items": 2, "seq_len": 8,
                                              "vocab_size": 32}], "analyses": ["head-stats"]}
    return run_sweep(spec, ctx.work / "sw", progress=False, **kwargs)


def _load_sweep(ctx, name, **kwargs):
    from attnscope.sweeps import load_sweep

    return load_sweep(ctx.inp / name, **kwargs)


def _resolve(ctx, relative):
    from attnscope.dashboards.files import ResultsRoot

    return ResultsRoot(ctx.inp).resolve(relative)


def _plan(text):
    from attnscope.probes.remote import plan_from_json

    return plan_from_json(text)


def _rollout(attn, **kwargs):
    from attnscope.circuits.attention_rollout import rollout

    return rollout(attn, **kwargs)


def _relevance(ctx, **kwargs):
    from attnscope.circuits.relevance_propagation import relevance

    return relevance(ctx.minilm, "Paris is in France.", **kwargs)


def _score(ctx, name, suite, **kwargs):
    from attnscope.circuits.registry import get_analysis

    return get_analysis(name).fn(ctx.minilm, suite, progress=False, **kwargs)


def _suite():
    return PromptSuite("s", [PromptItem(text="The cat sat on the mat.")])


CASES = [
    # --- capture: selections that would be empty or wrong ---------------------------------------------------------
    ("sites missing", lambda c: _cap(c, sites=[Site("text", 9)]), SiteError),
    ("sites other tower", lambda c: _cap(c, sites=[Site("vision", 0)]), SiteError),
    ("sites as strings", lambda c: _cap(c, sites=["text.L0.self"]), SiteError),
    ("sites empty list", lambda c: _cap(c, sites=[]), SiteError),
    ("towers unknown", lambda c: _cap(c, towers=["nope"]), SiteError),
    ("towers str unknown", lambda c: _cap(c, towers="nope"), SiteError),
    ("towers empty", lambda c: _cap(c, towers=[]), SiteError),
    ("towers not str", lambda c: _cap(c, towers=[3]), InputError),
    ("headset layer out of range", lambda c: _cap(c, heads=HeadSet([(9, 0)])), HeadSpecError),
    ("headset head out of range", lambda c: _cap(c, heads=HeadSet([(0, 99)])), HeadSpecError),
    ("headset empty", lambda c: _cap(c, heads=HeadSet()), HeadSpecError),
    ("heads spec out of range", lambda c: _cap(c, heads="L9H0"), HeadSpecError),
    ("heads malformed pairs", lambda c: _cap(c, heads=[(0, "a")]), HeadSpecError),
    ("heads number", lambda c: _cap(c, heads=3), HeadSpecError),
    ("implementation bogus", lambda c: _cap(c, implementation="bogus"), InputError),
    ("rows strings", lambda c: _cap(c, rows=["a"]), InputError),
    ("rows empty list", lambda c: _cap(c, rows=[]), InputError),
    ("rows floats", lambda c: _cap(c, rows=[1.5]), InputError),
    ("rows number", lambda c: _cap(c, rows=3), InputError),
    ("rows out of range", lambda c: _cap(c, rows=[99]), InputError),
    ("rows reversed slice", lambda c: _cap(c, rows="4:2"), InputError),
    ("rows last:0", lambda c: _cap(c, rows="last:0"), InputError),
    ("rows beyond the input", lambda c: _cap(c, rows="10:20"), InputError),
    ("rows malformed", lambda c: _cap(c, rows="every other"), InputError),
    ("mass spans reversed", lambda c: _cap(c, stats=("mass",), mass_spans=[(5, 2)]), InputError),
    ("mass spans negative", lambda c: _cap(c, stats=("mass",), mass_spans=[(-1, 2)]), InputError),
    ("mass spans beyond keys", lambda c: _cap(c, stats=("mass",), mass_spans=[(0, 50)]), InputError),
    ("mass spans one number", lambda c: _cap(c, stats=("mass",), mass_spans=[(1,)]), InputError),
    ("mass spans strings", lambda c: _cap(c, stats=("mass",), mass_spans=[("a", "b")]), InputError),
    ("mass spans a string", lambda c: _cap(c, stats=("mass",), mass_spans="ab"), InputError),
    ("mass spans a number", lambda c: _cap(c, stats=("mass",), mass_spans=3), InputError),
    ("mass spans empty", lambda c: _cap(c, stats=("mass",), mass_spans=[]), InputError),
    ("stats unknown", lambda c: _cap(c, stats=("bogus",)), InputError),
    ("stats a number", lambda c: _cap(c, stats=3), InputError),
    ("topk zero", lambda c: _cap(c, stats=("topk",), topk=0), InputError),
    ("topk string", lambda c: _cap(c, stats=("topk",), topk="3"), InputError),
    ("steps none reached", lambda c: _cap(c, steps=[5]), CaptureError),
    # --- capture: inputs -------------------------------------------------------------------------------------------
    ("ids empty", lambda c: _cap(c, torch.empty(1, 0, dtype=torch.long)), InputError),
    ("ids float", lambda c: _cap(c, torch.tensor([[1.0, 2.0]])), InputError),
    ("ids bool", lambda c: _cap(c, torch.tensor([[True, False]])), InputError),
    ("ids 3-D", lambda c: _cap(c, torch.ones(1, 2, 3, dtype=torch.long)), InputError),
    ("ids 0-D", lambda c: _cap(c, torch.tensor(3)), InputError),
    ("ids beyond vocabulary", lambda c: _cap(c, torch.tensor([[1, 999]])), InputError),
    ("ids negative", lambda c: _cap(c, torch.tensor([[-1, 2]])), InputError),
    ("ids dict beyond vocabulary", lambda c: _cap(c, {"input_ids": torch.tensor([[1, 64]])}), InputError),
    ("ids too long", lambda c: _cap(c, torch.ones(1, 100, dtype=torch.long)), InputTooLongError),
    ("inputs empty list", lambda c: _cap(c, []), InputError),
    ("inputs a number", lambda c: _cap(c, 42), InputError),
    ("text without tokenizer", lambda c: _cap(c, "hello"), InputError),
    ("text not UTF-8", lambda c: attnscope.capture(c.minilm, "caf\udce9"), InputError),
    ("text list not UTF-8", lambda c: attnscope.capture(c.minilm, ["ok", "caf\udce9"]), InputError),
    ("text too long", lambda c: attnscope.capture(c.minilm, "word " * 600), InputTooLongError),
    # --- heads, sites ----------------------------------------------------------------------------------------------
    ("headset parse malformed", lambda c: HeadSet.parse("bogus"), HeadSpecError),
    ("headset parse None", lambda c: HeadSet.parse(None), HeadSpecError),
    ("headset parse wildcard unsized", lambda c: HeadSet.parse("L1H*"), HeadSpecError),
    ("headset negative", lambda c: HeadSet([(-1, 0)]), HeadSpecError),
    ("headset validate", lambda c: HeadSet([(3, 0)]).validate(2, 4), HeadSpecError),
    ("site kind", lambda c: Site("text", 0, "sideways"), SiteError),
    ("site negative layer", lambda c: Site("text", -1), SiteError),
    ("trace site missing", lambda c: c.trace.get(Site("text", 9)), SiteError),
    ("trace stat missing", lambda c: c.trace.stat("entropy"), SiteError),
    # --- load ------------------------------------------------------------------------------------------------------
    ("load missing path", lambda c: attnscope.load("/no/such/dir"), ModelNotFoundError),
    ("load zoo unknown", lambda c: attnscope.load("zoo:nope"), ModelNotFoundError),
    ("load a file", lambda c: attnscope.load(c.inp / "afile"), ModelNotFoundError),
    ("load no config", lambda c: attnscope.load(c.inp / "model_noconfig"), ModelNotFoundError),
    ("load unknown type", lambda c: attnscope.load(c.inp / "model_badtype"), AttnscopeError),
    ("load non-UTF-8 config", lambda c: attnscope.load(c.inp / "model_nonutf8"), AttnscopeError),
    ("load bad JSON config", lambda c: attnscope.load(c.inp / "model_badjson"), AttnscopeError),
    # --- traces and tables on disk ---------------------------------------------------------------------------------
    ("trace load missing", lambda c: AttentionTrace.load(c.inp / "nope.safetensors"), CorruptResultError),
    ("trace load text file", lambda c: AttentionTrace.load(c.inp / "afile"), CorruptResultError),
    ("trace load garbage", lambda c: AttentionTrace.load(c.inp / "garbage.safetensors"), CorruptResultError),
    ("trace save to a folder", lambda c: c.trace.save(c.inp / "adir"), OutputError),
    ("trace save under a file", lambda c: c.trace.save(c.inp / "afile" / "t.safetensors"), OutputError),
    ("trace save empty path", lambda c: c.trace.save(""), OutputError),
    ("trace save unwritable", lambda c: c.trace.save("/proc/t.safetensors"), OutputError),
    ("trace save unjsonable provenance",
     lambda c: AttentionTrace(list(c.trace.records.values()), c.trace.tokens, {"x": {1, 2}}).save(c.work / "t"),
     InputError),
    ("table load missing", lambda c: ResultTable.load(c.inp / "nope.parquet"), CorruptResultError),
    ("table load garbage", lambda c: ResultTable.load(c.inp / "garbage.parquet"), CorruptResultError),
    ("table missing columns", lambda c: ResultTable(pd.DataFrame({"a": [1]})), CorruptResultError),
    ("table save to a folder", lambda c: c.table.save(c.inp / "adir"), OutputError),
    ("table save under a file", lambda c: c.table.save(c.inp / "afile" / "x.parquet"), OutputError),
    ("table save unwritable", lambda c: c.table.save("/proc/x.parquet"), OutputError),
    ("table save mixed column", lambda c: ResultTable(c.table.df.assign(extra=[{"a": 1}, 3])).save(c.work / "x"),
     InputError),
    # --- suites ----------------------------------------------------------------------------------------------------
    ("suite non-UTF-8 file", lambda c: PromptSuite.from_json(c.inp / "bad.json"), CorruptResultError),
    ("suite non-UTF-8 bytes", lambda c: PromptSuite.from_json(b"\xff\xfe"), CorruptResultError),
    ("suite without name", lambda c: PromptSuite.from_json(c.inp / "noname.json"), CorruptResultError),
    ("suite without items", lambda c: PromptSuite.from_json(c.inp / "noitems.json"), CorruptResultError),
    ("suite invalid JSON", lambda c: PromptSuite.from_json("{nope"), CorruptResultError),
    ("suite deep JSON", lambda c: PromptSuite.from_json(c.inp / "deep.json"), CorruptResultError),
    ("suite missing file", lambda c: PromptSuite.from_json(c.inp / "missing.json"), CorruptResultError),
    ("suite from a number", lambda c: PromptSuite.from_json(123), InputError),
    ("suite wrong format", lambda c: PromptSuite.from_json(c.inp / "wrongformat.json"), CorruptResultError),
    ("suite save to a folder", lambda c: _suite().to_json(c.inp / "adir"), OutputError),
    ("prompt item empty", lambda c: PromptItem(), InputError),
    ("prompt item bad ids", lambda c: PromptItem(ids="ab"), InputError),
    ("suite nan metadata", lambda c: PromptSuite("s", [PromptItem(ids=[1])], metadata={"x": float("nan")}),
     InputError),
    ("suite batch size 0", lambda c: next(_suite().batches(0)), InputError),
    # --- analyses --------------------------------------------------------------------------------------------------
    ("analysis unknown", lambda c: __import__("attnscope.circuits.registry", fromlist=["x"]).get_analysis("nope"),
     AnalysisError),
    ("sinks unknown option", lambda c: _score(c, "sinks", _suite(), colour="red"), AnalysisError),
    ("pattern without template", lambda c: _score(c, "pattern", _suite()), InputError),
    ("pattern pickled template", lambda c: _score(c, "pattern", _suite(), template=str(c.inp / "object.npy")),
     InputError),
    ("relevance position", lambda c: _relevance(c, position=999), AnalysisError),
    ("relevance target headless", lambda c: _relevance(c, target=3), AnalysisError),
    ("rollout 2-D attention", lambda c: _rollout(torch.ones(3, 3)), AttnscopeError),
    ("rollout fusion", lambda c: _rollout(torch.softmax(torch.randn(2, 1, 2, 3, 3), -1), head_fusion="median"),
     AttnscopeError),
    # --- sweeps ----------------------------------------------------------------------------------------------------
    ("spec name ..", lambda c: _sweep_spec(name="../../x"), InputError),
    ("spec name slash", lambda c: _sweep_spec(name="a/b"), InputError),
    ("spec not a mapping", lambda c: __import__("attnscope.sweeps", fromlist=["x"]).parse_spec([]), InputError),
    ("spec file non-UTF-8", lambda c: __import__("attnscope.sweeps", fromlist=["x"]).load_spec(c.inp / "bad.yaml"),
     InputError),
    ("spec file deep YAML", lambda c: __import__("attnscope.sweeps", fromlist=["x"]).load_spec(c.inp / "deep.yaml"),
     InputError),
    ("run_sweep workers 0", lambda c: _run_sweep(c, workers=0), InputError),
    ("run_sweep workers negative", lambda c: _run_sweep(c, workers=-1), InputError),
    ("load_sweep manifest without cells", lambda c: _load_sweep(c, "sweep_nocells"), CorruptResultError),
    ("load_sweep manifest non-UTF-8", lambda c: _load_sweep(c, "sweep_nonutf8"), CorruptResultError),
    ("load_sweep manifest bad JSON", lambda c: _load_sweep(c, "sweep_badjson"), CorruptResultError),
    ("load_sweep empty folder", lambda c: _load_sweep(c, "sweep_empty"), CorruptResultError),
    ("load_sweep missing folder", lambda c: _load_sweep(c, "nope"), CorruptResultError),
    # --- remote plans ----------------------------------------------------------------------------------------------
    ("plan non-UTF-8", lambda c: _plan(str(c.inp / "bad_plan.json")), InputError),
    ("plan list", lambda c: _plan("[]"), InputError),
    ("plan invalid JSON", lambda c: _plan("{nope"), InputError),
    ("plan without mode", lambda c: _plan(str(c.inp / "plan_nomode.json")), InputError),
    ("plan missing file", lambda c: _plan(str(c.inp / "missing.json")), InputError),
    # --- dashboard paths -------------------------------------------------------------------------------------------
    ("results root missing", lambda c: __import__("attnscope.dashboards.files", fromlist=["x"]).ResultsRoot(
        c.inp / "nope"), InputError),
    ("resolve hidden file", lambda c: _resolve(c, ".hidden.json"), InputError),
    ("resolve hidden folder", lambda c: _resolve(c, ".git/config.json"), InputError),
    ("resolve very long path", lambda c: _resolve(c, "a/" * 3000 + "x.json"), InputError),
    ("resolve long name", lambda c: _resolve(c, "x" * 5000 + ".json"), InputError),
]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, minilm):
    inp = make_inputs(tmp_path_factory.mktemp("bad-api-inputs"))
    (inp / ".hidden.json").write_text("{}")
    gpt2 = tiny_text_model("gpt2")
    trace = attnscope.capture(gpt2, IDS, heads="L0H1")
    table = ResultTable.from_records([{"analysis": "a", "layer": 0, "head": h, "metric": "m", "value": 0.5}
                                      for h in range(2)])
    return types.SimpleNamespace(inp=inp, gpt2=gpt2, minilm=minilm, trace=trace, table=table, work=None)


@pytest.mark.parametrize("name,call,kind", CASES, ids=[c[0] for c in CASES])
def test_bad_api_input_raises_a_named_error(name, call, kind, ctx, tmp_path):
    ctx.work = tmp_path
    before = snapshot(ctx.inp, tmp_path)
    with pytest.raises(AttnscopeError) as caught:
        call(ctx)
    err = caught.value
    assert isinstance(err, kind), f"{type(err).__name__}: {err}"
    assert err.expected is not None and str(err.expected) and err.got is not None, str(err)
    assert err.fix and err.fix.strip(), str(err)
    assert "\n" not in str(err) or True
    assert not left_behind(before, snapshot(ctx.inp, tmp_path))


def test_capture_refusals_leave_the_model_unhooked(ctx):
    """A refused capture (here: rows beyond the input, found inside the forward) removes every hook."""
    before = {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in ctx.gpt2.named_modules()}
    impl = ctx.gpt2.config._attn_implementation
    with pytest.raises(InputError):
        _cap(ctx, rows="10:20")
    after = {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in ctx.gpt2.named_modules()}
    assert after == before and ctx.gpt2.config._attn_implementation == impl
    assert attnscope.capture(ctx.gpt2, IDS).stack().shape == (2, 1, 4, 5, 5)  # and it still captures


def test_errors_survive_pickling():
    """Ray ships errors between processes: the parts (and the single 'Fix:') survive."""
    import pickle

    err = pickle.loads(pickle.dumps(InputError("bad", expected="x", got="y", fix="do z")))
    assert (err.what, err.expected, err.got, err.fix) == ("bad", "x", "y", "do z")
    assert str(err).count("Fix:") == 1 and json.dumps(str(err))
