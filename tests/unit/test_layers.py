"""The house keeps its layers: the import-linter contract in pyproject.toml holds, nothing imports the package
root from inside, and no function-local import hides an import cycle. Each check is also run on a small planted
package that breaks it, so a check that cannot fail would be noticed."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"


def _module_name(path: Path, src: Path) -> str:
    parts = list(path.with_suffix("").relative_to(src).parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _function_local_imports(path: Path, src: Path, package: str) -> list[tuple[str, int, list[str]]]:
    """(importer, line, candidate modules) of every import of ``package`` inside a function body: for ``from X
    import y`` the candidates are ``X.y`` (a submodule) and then ``X``."""
    module = _module_name(path, src)
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out = []
    for fn in ast.walk(ast.parse(path.read_text())):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = base[: len(base) - node.level + 1]
                    target = ".".join(anchor + ([node.module] if node.module else []))
                elif node.module and node.module.split(".")[0] == package:
                    target = node.module
                else:
                    continue
                out.append((module, node.lineno, [f"{target}.{a.name}" for a in node.names] + [target]))
            elif isinstance(node, ast.Import):
                out += [(module, node.lineno, [a.name]) for a in node.names if a.name.split(".")[0] == package]
    return out


def hidden_cycles(package: str, src: Path) -> list[str]:
    """Function-local imports ``A -> B`` where ``B`` imports ``A`` back (directly or not): a cycle kept out of
    sight by importing late."""
    graph = grimp.build_graph(package, include_external_packages=False)
    found = []
    for path in sorted((src / package).rglob("*.py")):
        for importer, line, candidates in _function_local_imports(path, src, package):
            imported = next((m for m in candidates if m in graph.modules), None)
            if imported is None or imported == importer:
                continue
            chain = graph.find_shortest_chain(importer=imported, imported=importer)
            if chain:
                found.append(f"{importer}:{line} imports {imported}, which imports it back: {' > '.join(chain)}")
    return found


def root_importers(package: str) -> list[str]:
    """Modules inside ``package`` that import the package root itself (everything below the root is lower)."""
    graph = grimp.build_graph(package, include_external_packages=False)
    return sorted(m for m in graph.modules if m != package and package in graph.find_modules_directly_imported_by(m))


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    sys.path.insert(0, str(tmp_path))
    return tmp_path


def test_import_linter_contract_is_kept():
    linter = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(linter), "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "1 kept, 0 broken" in result.stdout


def test_no_function_local_import_hides_a_cycle():
    assert hidden_cycles("attnscope", SRC) == []


def test_nothing_inside_imports_the_package_root():
    assert root_importers("attnscope") == []


def test_the_checks_catch_what_they_look_for(tmp_path):
    src = _plant(tmp_path, {
        "planted/__init__.py": "",
        "planted/low.py": "def f():\n    from . import high\n    return high\n",
        "planted/high.py": "from . import low\nimport planted\n",
    })
    try:
        cycles = hidden_cycles("planted", src)
        assert len(cycles) == 1 and cycles[0].startswith("planted.low:2 imports planted.high")
        assert root_importers("planted") == ["planted.high"]
    finally:
        sys.path.remove(str(src))
    broken = tmp_path / "broken.toml"
    broken.write_text(textwrap.dedent("""
        [tool.importlinter]
        root_package = "planted"
        [[tool.importlinter.contracts]]
        name = "low below high"
        type = "layers"
        containers = ["planted"]
        layers = ["high", "low"]
    """))
    linter = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(linter), "--config", str(broken)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode != 0 and "planted.low -> planted.high" in result.stdout, result.stdout[-2000:]
