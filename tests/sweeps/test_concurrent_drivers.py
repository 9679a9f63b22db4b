"""Two sweep drivers on one results folder share the cells (each runs once, none is lost), and a local sweep's Ray
processes listen on the loopback interface only (read from the operating system's socket table)."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import yaml
from tiny_models import tiny_text_model

from attnscope.sweeps import load_sweep
from attnscope.sweeps.store import PART

PLUGINS = str(Path(__file__).with_name("plugins.py"))
N = 6
LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1", "::1")


def _spec(tmp_path: Path, log: Path, seconds: float = 1.0) -> Path:
    analyses = [{"name": "test-slow", "label": f"slow{i}", "options": {"seconds": seconds, "log": str(log),
                                                                       "tag": f"slow{i}"}} for i in range(N)]
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({
        "name": "shared", "imports": [PLUGINS], "models": ["./gpt2"], "analyses": analyses,
        "suites": [{"generator": "induction", "n_items": 2, "seq_len": 16, "vocab_size": 64}]}))
    return path


def _driver(tmp_path: Path, spec: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "attnscope.cli", "sweep", str(spec), "--out", str(out),
                             "--workers", "1", "--quiet"], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_two_drivers_on_one_folder_run_every_cell_once(tmp_path):
    tiny_text_model("gpt2").save_pretrained(tmp_path / "gpt2")
    log, out = tmp_path / "executions.log", tmp_path / "out"
    spec = _spec(tmp_path, log)
    first = _driver(tmp_path, spec, out)
    time.sleep(1.0)  # the second one starts while the first is starting Ray or running its first cell
    second = _driver(tmp_path, spec, out)
    results = [p.communicate(timeout=240) for p in (first, second)]
    for proc, (stdout, stderr) in zip((first, second), results):
        assert proc.returncode == 0, stderr[-3000:]
    runs = [line.split()[0] for line in log.read_text().splitlines()]
    assert sorted(runs) == sorted(f"slow{i}" for i in range(N)), runs  # each cell executed exactly once
    table = load_sweep(out)
    assert table.df.cell.nunique() == N and not table.provenance["missing"] and not table.provenance["failed"]
    done = [int(stdout.split(" cells done")[0].split()[-1]) for stdout, _ in results]
    assert sum(done) == N, [r[0] for r in results]  # ... by one driver or the other, counted once
    pids = {line.split()[1] for line in log.read_text().splitlines()}
    assert len(pids) >= 2, "both drivers' workers ran cells"  # the second driver took part of the work
    assert not list(out.glob("cell=*/.*.tmp")) and len(list(out.glob(f"cell=*/{PART}"))) == N


def _listening(root_pid: int) -> dict[int, list[tuple[str, int]]]:
    """Listening TCP sockets of ``root_pid`` and all its descendants (Ray's GCS, raylet, agents, workers)."""
    try:
        root = psutil.Process(root_pid)
        pids = {root_pid} | {c.pid for c in root.children(recursive=True)}
    except psutil.NoSuchProcess:
        return {}
    found: dict[int, list[tuple[str, int]]] = {}
    for conn in psutil.net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
            found.setdefault(conn.pid, []).append((conn.laddr.ip, conn.laddr.port))
    return found


def test_local_sweep_listens_on_loopback_only(tmp_path):
    """Every socket a local sweep's Ray processes listen on is bound to 127.0.0.1 (none on 0.0.0.0, :: or the
    machine's network address), read from the socket table while the cells run."""
    tiny_text_model("gpt2").save_pretrained(tmp_path / "gpt2")
    spec = _spec(tmp_path, tmp_path / "executions.log", seconds=1.5)
    driver = _driver(tmp_path, spec, tmp_path / "out")
    seen: dict[int, list[tuple[str, int]]] = {}
    names: dict[int, str] = {}

    def watch() -> None:
        while driver.poll() is None:
            for pid, addresses in _listening(driver.pid).items():
                seen.setdefault(pid, [])
                seen[pid] += [a for a in addresses if a not in seen[pid]]
                try:
                    names.setdefault(pid, psutil.Process(pid).name())
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.2)

    watcher = threading.Thread(target=watch)
    watcher.start()
    _, err = driver.communicate(timeout=240)
    watcher.join()
    assert driver.returncode == 0, err[-3000:]
    assert len(seen) >= 3, f"too few Ray processes seen listening: {names}"  # GCS, raylet, workers ...
    assert {n.split("::")[0] for n in names.values()} & {"gcs_server", "raylet"}, names
    wide = {names.get(pid, pid): [a for a in addrs if a[0] not in LOOPBACK] for pid, addrs in seen.items()}
    assert not any(wide.values()), wide
    assert "Token authentication" not in err and not err.strip(), err[-2000:]  # no Ray chatter on stderr


def test_an_error_after_ray_started_is_still_one_line(tmp_path, capfd):
    """A cell no local worker can ever run is refused after Ray started: Ray's start-up notices (its token
    warning, 'Started a local Ray instance') must not add lines to the one-line error."""
    from attnscope.cli import main

    tiny_text_model("gpt2").save_pretrained(tmp_path / "gpt2")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "big", "models": [str(tmp_path / "gpt2")],
                                    "resources": {"num_cpus": 64}, "analyses": ["head-stats"],
                                    "suites": [{"generator": "induction", "n_items": 2, "seq_len": 16,
                                                "vocab_size": 64}]}))
    rc = main(["sweep", str(spec), "--out", str(tmp_path / "out"), "--workers", "1", "--quiet"])
    err = capfd.readouterr().err
    assert rc == 2 and len(err.splitlines()) == 1 and "can never be scheduled" in err, err[-2000:]
    assert not list((tmp_path / "out").glob("cell=*/part.parquet"))
