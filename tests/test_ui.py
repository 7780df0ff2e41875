"""`rmctl ui`: the MLflow server it starts listens on 127.0.0.1 only and stops with it."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _listening(processes: list[psutil.Process], port: int) -> list[str]:
    """Return the addresses on which `processes` listen on `port`."""
    addresses = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            for connection in process.net_connections(kind="inet"):
                if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port:
                    addresses.append(connection.laddr.ip)
    return addresses


def test_ui_listens_on_loopback_and_stops(tmp_path: Path):
    # An empty SQLite file is a valid store, in which the server creates its tables.
    (tmp_path / "mlflow").mkdir()
    (tmp_path / "mlflow" / "mlflow.db").touch()
    port = _free_port()
    log = tmp_path / "ui.log"
    with log.open("w") as log_file:
        command = subprocess.Popen(
            [sys.executable, "-m", "resmom.cli", "ui", "--data-dir", str(tmp_path),
             "--port", str(port)],
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        addresses: list[str] = []
        while not addresses:
            assert command.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the MLflow server did not listen within 120 s"
            time.sleep(0.5)
            tree = psutil.Process(command.pid).children(recursive=True)
            addresses = _listening(tree, port)
        # Every process of the server, uvicorn's workers included, listens on loopback only.
        assert set(addresses) == {"127.0.0.1"}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as response:
            assert response.status == 200

        # SIGTERM to the command alone, as `kill` sends it, stops the whole server.
        tree = psutil.Process(command.pid).children(recursive=True)
        command.send_signal(signal.SIGTERM)
        assert command.wait(timeout=30) == 143
        _, alive = psutil.wait_procs(tree, timeout=15)
        assert [p for p in alive if p.status() != psutil.STATUS_ZOMBIE] == []
    finally:
        # Leave nothing running if an assertion failed first.
        command.kill()
        for process in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        command.wait()
