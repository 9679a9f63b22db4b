"""The public face: each subpackage exports its public names without clashing with its own modules, and the
notebooks and the README use only those names (``attnscope.X`` or ``attnscope.<subpackage>.X`` with X exported)."""

import ast
import importlib
import json
import pkgutil
import re
from pathlib import Path

import pytest

import attnscope

ROOT = Path(__file__).resolve().parents[2]
SUBPACKAGES = ("probes", "models", "datasets", "circuits", "tasks", "viz", "zoo", "sweeps", "dashboards", "kernels")


def exported(package: str) -> set[str]:
    module = importlib.import_module(f"attnscope.{package}" if package else "attnscope")
    return set(module.__all__)


def private_uses(code: str) -> list[str]:
    """Imports and attribute chains of ``code`` that reach past the public names."""
    problems = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "attnscope":
            parts = node.module.split(".")
            package = ".".join(parts[1:])
            if len(parts) > 2 or (package and package not in SUBPACKAGES):
                problems.append(f"from {node.module} import ...")
                continue
            public = exported(package) | (set(SUBPACKAGES) if not package else set())
            problems += [f"from {node.module} import {a.name}" for a in node.names if a.name not in public]
        elif isinstance(node, ast.Import):
            problems += [f"import {a.name}" for a in node.names if a.name.startswith("attnscope.")]
    for chain in re.findall(r"\battnscope((?:\.\w+)+)", code):
        parts = chain.strip(".").split(".")
        if parts[0] in SUBPACKAGES:
            if len(parts) > 1 and parts[1] not in exported(parts[0]):
                problems.append(f"attnscope.{'.'.join(parts[:2])}")
        elif parts[0] not in exported("") and parts[0] != "__version__":
            problems.append(f"attnscope.{parts[0]}")
    return problems


def notebook_code(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    lines = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    return "\n".join(line for line in "\n".join(lines).splitlines() if not line.lstrip().startswith(("!", "%")))


def readme_code() -> str:
    return "\n".join(re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S))


@pytest.mark.parametrize("notebook", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_notebooks_use_only_the_public_api(notebook):
    assert private_uses(notebook_code(notebook)) == []


def test_readme_uses_only_the_public_api():
    code = readme_code()
    assert code.count("\n") > 10
    assert private_uses(code) == []


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_exports_exist_and_do_not_clash_with_modules(package):
    module = importlib.import_module(f"attnscope.{package}")
    modules = {m.name for m in pkgutil.iter_modules(module.__path__)}
    names = exported(package)
    assert names, f"attnscope.{package} exports nothing"
    assert names & modules == set()
    assert [n for n in sorted(names) if getattr(module, n, None) is None] == []


def test_root_exports_resolve_and_name_no_subpackage():
    assert exported("") & set(SUBPACKAGES) == set()
    assert all(getattr(attnscope, name) is not None for name in attnscope.__all__)


def test_the_checker_sees_private_uses():
    code = ("from attnscope.circuits.attention_rollout import rollout\nimport attnscope.probes.capturing\n"
            "x = attnscope.circuits.head_ablation\nfrom attnscope.circuits import rollout, _diffusion\n")
    assert sorted(private_uses(code)) == sorted([
        "from attnscope.circuits.attention_rollout import ...", "from attnscope.circuits import _diffusion",
        "import attnscope.probes.capturing", "attnscope.circuits.attention_rollout", "attnscope.probes.capturing",
        "attnscope.circuits.head_ablation"])
