"""Remote execution through nnsight, tested up to the request (no backend is reachable from here).

The plan runs in nnsight's local simulation of the remote path (the request serialised and deserialised as for
the server, then run here) and must equal the direct path; the serialised request must not import attnscope
(the server does not have it); an unreachable or silent backend must fail fast with RemoteError."""

import io
import pickletools
import socket
import time

import pytest
import torch
from tiny_models import tiny_text_model
from plugins import word_tokenizer

import attnscope
from attnscope.errors import InputError, RemoteError
from attnscope.probes.heads import HeadSet
from attnscope.probes.interventions import InterventionPlan, apply_plan, mean_plan, resample_plan
from attnscope.probes.remote import RemoteSettings, remote_adapter, remote_capture, remote_run

INPUTS = {"input_ids": torch.tensor([[1, 5, 9, 2, 7, 3], [4, 6, 2, 9, 0, 0]]),
          "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    for family in ("gpt2", "llama", "bert"):
        tiny_text_model(family).save_pretrained(root / family)
        word_tokenizer().save_pretrained(root / family)
    return root


@pytest.fixture(scope="module", params=["gpt2", "llama", "bert"])
def model(request, saved):
    return attnscope.load(saved / request.param)


def _direct(model, plan, **options):
    with apply_plan(model, plan) if plan is not None else torch.no_grad():
        return attnscope.capture(model, INPUTS, **options)


def _out(output):
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


def _equal(a, b, names):
    for name in names:
        assert torch.equal(a.stat(name), b.stat(name)), name
    assert torch.equal(_out(a.output), _out(b.output))


def test_local_simulation_equals_direct_capture(model):
    stats = dict(stats=("mass", "entropy", "topk"), mass_spans=[(0, 1), (1, 3)], topk=2)
    _equal(remote_capture(model, INPUTS, remote="local", **stats), _direct(model, None, **stats),
           ("mass", "entropy", "topk_index", "topk_weight"))
    patterns = remote_capture(model, INPUTS, remote="local", heads="L1H0,L1H3", rows="last:2")
    assert torch.equal(patterns.stack(), _direct(model, None, heads="L1H0,L1H3", rows="last:2").stack())


@pytest.mark.parametrize("make", ["zero", "zero-kv", "rescale", "mean"])
def test_plan_in_the_trace_equals_apply_plan(model, make):
    if make == "zero":
        plan = InterventionPlan(HeadSet([(0, 1), (1, 3)]), "zero")
    elif make == "zero-kv":
        plan = InterventionPlan(HeadSet([(0, 1)]), "zero", select="kv")  # GQA on llama: both query heads
    elif make == "rescale":
        plan = InterventionPlan(HeadSet([(0, 0), (0, 2)]), "rescale", scale=3.0)
    else:
        plan = mean_plan(model.module, HeadSet([(0, 2), (1, 1)]), [[3, 4, 5, 6, 7, 8, 9], [9, 8, 7]],
                         per_position=True)
    stats = dict(stats=("mass", "entropy"))
    remote = remote_capture(model, INPUTS, remote="local", plan=plan, **stats)
    _equal(remote, _direct(model, plan, **stats), ("mass", "entropy"))
    with torch.no_grad():
        assert not torch.equal(_out(remote.output), _out(model.module(**INPUTS)))  # the plan acted
    assert remote.provenance["remote"]["plan"] == plan.to_dict()
    output = remote_run(model, INPUTS, remote="local", plan=plan)  # no capture: only the output comes back
    assert torch.equal(_out(output), _out(remote.output))


def test_eager_model_reads_weights_after_the_edit(saved):
    """Under eager attention the trace reads attn.output[1]; on GPT-2 the projection runs inside that module, so
    the edit must come before the read (execution order)."""
    model = attnscope.load(saved / "gpt2", attn_implementation="eager")
    plan = InterventionPlan(HeadSet([(0, 1), (1, 2)]), "zero")
    remote = remote_capture(model, INPUTS, remote="local", plan=plan)
    assert "eager weights" in remote.provenance["attention_path"]
    direct = _direct(model, plan)
    assert torch.allclose(remote.stack(), direct.stack(), atol=1e-6)
    assert torch.equal(remote.output.logits, direct.output.logits)


def _globals_in(blob: bytes) -> set[str]:
    """Modules the pickle imports by reference (STACK_GLOBAL / GLOBAL opcodes)."""
    memo, strings, found = {}, [], set()
    for op, arg, _ in pickletools.genops(io.BytesIO(blob)):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
            strings.append(arg)
        elif op.name == "MEMOIZE":
            memo[len(memo)] = strings[-1] if strings else None
        elif op.name in ("BINGET", "LONG_BINGET", "GET"):
            strings.append(memo.get(arg))
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            found.add(str(strings[-2]))
        elif op.name == "GLOBAL":
            found.add(arg.split(" ", 1)[0])
    return found


def test_request_does_not_import_attnscope_on_the_server(saved):
    """The serialised request ships attnscope's in-trace code by value: the server needs only nnsight/torch."""
    from cloudpickle import unregister_pickle_by_value
    from nnsight.schema.request import RequestModel

    import attnscope.probes.adapters.nnsight_model as nm
    import attnscope.probes.remote as rm

    model = attnscope.load(saved / "llama")
    plan = mean_plan(model.module, HeadSet([(1, 1)]), [[3, 4, 5], [6, 7, 8, 9]])
    blobs = []

    class Grab:
        def __call__(self, tracer):
            blobs.append(RequestModel.serialize(tracer, compress=False))
            tracer.execute(tracer.info.code)

    def run():
        adapter = remote_adapter(model, remote="local", plan=plan)
        adapter._backend = Grab
        return attnscope.capture(adapter, INPUTS, stats=("mass",))

    run()  # registers by value
    shipped = _globals_in(blobs[-1])
    assert not any(m.startswith("attnscope") for m in shipped), shipped
    assert {"torch", "nnsight.intervention.envoy"} <= shipped
    for module in (rm, nm):  # the scanner does see a by-reference import when there is one
        unregister_pickle_by_value(module)
    import attnscope.probes.remote as again

    again.trace_block(remote_adapter(model, remote=False).envoy, INPUTS, [], Grab())
    assert any(m.startswith("attnscope") for m in _globals_in(blobs[-1]))


def test_resample_and_uniform_are_refused(model):
    with pytest.raises(InputError, match="cannot run in a remote trace"):
        remote_capture(model, INPUTS, remote="local", plan=resample_plan(HeadSet([(0, 1)]), [[1, 2, 3, 4, 5, 6]]))
    with pytest.raises(InputError, match="cannot run in a remote trace"):
        remote_capture(model, INPUTS, remote="local", plan=InterventionPlan(HeadSet([(0, 1)]), "uniform"))


def test_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("ATTNSCOPE_NNSIGHT_HOST", "http://backend.example:8001")
    monkeypatch.setenv("NDIF_API_KEY", "secret")
    monkeypatch.setenv("ATTNSCOPE_NNSIGHT_TIMEOUT", "2.5")
    settings = RemoteSettings.from_env()
    assert settings.address == ("backend.example", 8001) and settings.api_key == "secret"
    assert settings.timeout == 2.5 and "secret" not in str(settings.describe())
    monkeypatch.delenv("ATTNSCOPE_NNSIGHT_HOST")
    import nnsight

    assert RemoteSettings.from_env().host == nnsight.CONFIG.API.HOST


def test_closed_port_fails_fast(model, monkeypatch):
    monkeypatch.setenv("ATTNSCOPE_NNSIGHT_HOST", "http://127.0.0.1:9")
    start = time.perf_counter()
    with pytest.raises(RemoteError, match="NDIF backend unreachable") as info:
        remote_capture(model, INPUTS, remote=True, stats=("mass",))
    assert time.perf_counter() - start < 5 and "127.0.0.1:9" in str(info.value)


@pytest.fixture
def silent_server():
    """Accepts TCP connections (kernel backlog) and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


def test_silent_backend_times_out(model, monkeypatch, silent_server):
    monkeypatch.setenv("ATTNSCOPE_NNSIGHT_HOST", silent_server)
    monkeypatch.setenv("ATTNSCOPE_NNSIGHT_TIMEOUT", "1")
    start = time.perf_counter()
    with pytest.raises(RemoteError, match="remote nnsight run failed"):
        remote_capture(model, INPUTS, remote=True, plan=InterventionPlan(HeadSet([(0, 1)]), "zero"),
                       stats=("mass",))
    assert time.perf_counter() - start < 10


def test_request_goes_to_the_configured_host_with_the_key(model, monkeypatch, silent_server):
    import websocket

    seen = {}

    def refuse(url, *args, **kwargs):
        seen.update(url=url, header=kwargs.get("header"), timeout=kwargs.get("timeout"))
        raise ConnectionRefusedError("planted")

    monkeypatch.setattr(websocket, "create_connection", refuse)
    monkeypatch.setenv("ATTNSCOPE_NNSIGHT_HOST", silent_server)
    monkeypatch.setenv("NDIF_API_KEY", "k-123")
    with pytest.raises(RemoteError, match="ConnectionRefusedError"):
        remote_capture(model, INPUTS, remote=True, stats=("mass",))
    assert seen["url"] == silent_server.replace("http", "ws") + "/subscribe"
    assert seen["header"] == {"ndif-api-key": "k-123"} and seen["timeout"] == 10.0


def test_cli(saved, tmp_path, monkeypatch, capsys):
    from attnscope.cli import main

    out = tmp_path / "t.safetensors"
    assert main(["remote-capture", "--model", str(saved / "gpt2"), "--text", "t3 t4 t5 t6", "--local-sim",
                 "--stats", "sink,entropy", "--out", str(out)]) == 0
    assert out.is_file() and "local simulation" in capsys.readouterr().out
    monkeypatch.setenv("ATTNSCOPE_NNSIGHT_HOST", "http://127.0.0.1:9")
    assert main(["remote-capture", "--model", str(saved / "gpt2"), "--text", "t3 t4", "--stats", "sink",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("attnscope: error: NDIF backend unreachable") and "\n" not in err
