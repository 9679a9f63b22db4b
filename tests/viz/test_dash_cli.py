"""``attnscope dash``: binds 127.0.0.1 by default, serves the page, refuses a raw ``../../etc/passwd`` request;
a missing results directory is one line on stderr and exit code 2."""

import http.client
import os
import socket
import subprocess
import sys
import time

import attnscope


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)  # sent as is: no client-side normalisation of '..'
        response = conn.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        conn.close()


def test_dash_command_serves_on_localhost_and_refuses_traversal(tmp_path):
    rows = [{"analysis": "a", "layer": 0, "head": h, "metric": "m", "value": float(h)} for h in range(3)]
    attnscope.ResultTable.from_records(rows).save(tmp_path / "run" / "t.parquet")
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "attnscope.cli", "dash", "--results", str(tmp_path), "--port",
                             str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.time() + 120
        while True:
            try:
                status, _ = _get(port, "/")
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, "dashboard did not start"
                time.sleep(0.3)
        assert status == 200
        status, body = _get(port, "/files/../../etc/passwd")
        assert status == 403 and body.startswith("refused: path refused") and "root:" not in body
        assert _get(port, "/files/run/t.parquet")[0] == 200
        with socket.socket() as s:  # bound to the loopback interface only
            s.settimeout(2)
            host_ip = socket.gethostbyname(socket.gethostname())
            if not host_ip.startswith("127."):
                assert s.connect_ex((host_ip, port)) != 0
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}/" in out


def test_dash_command_missing_directory_is_one_line_exit_2(tmp_path):
    from attnscope.cli import main

    assert main(["dash", "--results", str(tmp_path / "nope")]) == 2
