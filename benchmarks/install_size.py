"""Install size of the core attnscope (``pip install attnscope``) against ``attnscope[all]`` (issue #22).

Two modes:

- ``--quick`` (offline, seconds): the dependency closures of the core requirements and of ``[all]`` (read from
  ``pyproject.toml``), resolved through the metadata of the distributions installed in this environment (markers
  and extras evaluated, as pip would), with the size of their installed files. Nothing is downloaded or installed.
- default (network, minutes): the real thing. Two fresh venvs; in each, the pinned CPU torch first (an unpinned
  torch pulls GBs of CUDA packages), then ``pip install -c constraints.txt REPO`` (core) or ``REPO[all]``, timed;
  then the size of site-packages and the number of installed distributions. The venvs are deleted afterwards.

Usage: ``python benchmarks/install_size.py [--quick] [--torch torch==2.13.0] [--out results/bench_install.json]``
"""

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
NOT_COUNTED = {"pip", "setuptools", "wheel"}  # a fresh venv's own tools


def project_requirements() -> tuple[list[str], dict[str, list[str]]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return list(project["dependencies"]), dict(project.get("optional-dependencies", {}))


# ---- quick: closures from the installed metadata ---------------------------------------------------------------------

def _wanted(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({"extra": extra}) for extra in extras | {""})


def closure(requirements: list[str]) -> tuple[dict[str, metadata.Distribution], list[str]]:
    """Installed distributions needed by ``requirements`` (transitively); and the names not installed here."""
    found: dict[str, metadata.Distribution] = {}
    done: dict[str, set[str]] = {}
    missing: list[str] = []
    queue = [(Requirement(r), {""}) for r in requirements]
    while queue:
        req, parent_extras = queue.pop()
        if not _wanted(req, parent_extras):
            continue
        name = canonicalize_name(req.name)
        extras = set(req.extras)
        if name in done and extras <= done[name]:
            continue
        try:
            dist = found.get(name) or metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            missing.append(name)
            done[name] = extras
            continue
        found[name] = dist
        done[name] = done.get(name, set()) | extras
        queue += [(Requirement(r), extras) for r in dist.requires or []]
    return found, sorted(set(missing))


def installed_bytes(dist: metadata.Distribution) -> int:
    total = 0
    for file in dist.files or []:
        try:
            total += Path(dist.locate_file(file)).stat().st_size
        except OSError:
            pass
    return total


def quick() -> dict:
    core, extras = project_requirements()
    out: dict = {"mode": "quick (closure of the installed metadata, no install)", "python": sys.version.split()[0]}
    torch = set(closure([r for r in core if canonicalize_name(Requirement(r).name) == "torch"])[0])
    for label, reqs in (("core", core), ("all", core + extras["all"])):
        dists, missing = closure(reqs)
        sizes = {name: installed_bytes(d) for name, d in dists.items() if name not in NOT_COUNTED}
        beyond = {name: size for name, size in sizes.items() if name not in torch}
        out[label] = {"required": len(reqs), "packages": len(sizes), "bytes": sum(sizes.values()),
                      "gb": round(sum(sizes.values()) / 1e9, 3), "packages_beyond_torch": len(beyond),
                      "gb_beyond_torch": round(sum(beyond.values()) / 1e9, 3), "missing_here": missing,
                      "largest": dict(sorted(sizes.items(), key=lambda kv: -kv[1])[:8])}
    out["core_over_all"] = {k: round(out["core"][k] / max(out["all"][k], 1), 3) for k in ("packages", "bytes",
                                                                                       "packages_beyond_torch")}
    return out


# ---- full: real installs in fresh venvs ------------------------------------------------------------------------------

def _site_packages(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python*/site-packages"))
    return found[0] if found else venv / "Lib" / "site-packages"


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _listed(venv: Path) -> list[str]:
    listed = json.loads(subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format", "json"],
                                       check=True, capture_output=True, text=True).stdout)
    return sorted(p["name"] for p in listed if canonicalize_name(p["name"]) not in NOT_COUNTED)


def _children_cpu() -> float:
    """CPU seconds (user + system) of finished child processes: steadier than wall time on a shared machine."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def real_install(target: str, torch_spec: str, workdir: Path) -> dict:
    venv = workdir / re.sub(r"\W", "_", target)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-input"]
    start = time.perf_counter()
    subprocess.run([*pip, torch_spec], check=True)
    torch_s = time.perf_counter() - start
    torch_packages, torch_bytes = len(_listed(venv)), _dir_bytes(_site_packages(venv))
    start, cpu = time.perf_counter(), _children_cpu()
    subprocess.run([*pip, "-c", str(REPO / "constraints.txt"), target], check=True)
    install_s, install_cpu_s = time.perf_counter() - start, _children_cpu() - cpu
    names = _listed(venv)
    size = _dir_bytes(_site_packages(venv))
    check = subprocess.run([str(venv / "bin" / "python"), "-c", "import attnscope, sys; "
                            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"],
                           capture_output=True, text=True)
    shutil.rmtree(venv)
    return {"target": target, "torch": torch_spec, "torch_install_s": round(torch_s, 1),
            "install_s": round(install_s, 1), "install_cpu_s": round(install_cpu_s, 1), "packages": len(names),
            "site_packages_bytes": size, "site_packages_gb": round(size / 1e9, 3),
            "packages_beyond_torch": len(names) - torch_packages,
            "gb_beyond_torch": round((size - torch_bytes) / 1e9, 3),
            "import_attnscope_loads": check.stdout.strip() or check.stderr}


def full(torch_spec: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="attnscope-install-") as tmp:
        # the package is built from a copy of the source, so this checkout's build/ and egg-info stay untouched
        src = Path(tmp) / "src-copy"
        shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv*", "results", "*.egg-info", "build",
                                                                   "__pycache__", ".pytest_cache", ".grimp_cache"))
        shutil.copy(REPO / "constraints.txt", src / "constraints.txt")
        core = real_install(str(src), torch_spec, Path(tmp))
        everything = real_install(f"{src}[all]", torch_spec, Path(tmp))
    ratio = {k: round(core[k] / max(everything[k], 1e-9), 3) for k in ("install_s", "install_cpu_s", "packages",
                                                                       "site_packages_bytes")}
    return {"mode": "full (fresh venvs, real pip installs)", "python": sys.version.split()[0], "core": core,
            "all": everything, "core_over_all": ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="closures from this environment's metadata (offline)")
    parser.add_argument("--torch", default=os.environ.get("ATTNSCOPE_TORCH", "torch==2.13.0"),
                        help="the torch requirement installed first in each venv (keep it pinned)")
    parser.add_argument("--out", default="results/bench_install.json")
    args = parser.parse_args()
    result = quick() if args.quick else full(args.torch)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    for label in ("core", "all"):
        row = result[label]
        size = row.get("gb", row.get("site_packages_gb"))
        took = f", attnscope install {row['install_s']} s" if "install_s" in row else ""
        print(f"{label:5s}: {row['packages']:3d} packages ({row['packages_beyond_torch']} beyond torch's), {size} GB "
              f"({row['gb_beyond_torch']} GB beyond torch's){took}")
    print(f"core / all: {result['core_over_all']}  -> {out}")


if __name__ == "__main__":
    main()
