"""A real `mlflow server` (or `mlflow ui`) on loopback for tests: start, stop and restart on the same port
and store."""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM it when the process that started it dies, however
    that dies (SIGKILL, a timeout), so no server outlives an interrupted test run."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


_STARTED: list["MlflowServer"] = []


def _stop_all(*_args) -> None:
    for server in list(_STARTED):
        server.stop()


def _on_signal(signum, frame) -> None:
    _stop_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


atexit.register(_stop_all)
for _sig in (signal.SIGTERM, signal.SIGHUP):
    if signal.getsignal(_sig) in (signal.SIG_DFL, None):
        signal.signal(_sig, _on_signal)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """`mlflow server` with a SQLite backend and proxied artifacts under `root`."""

    def __init__(self, root: Path, port: int | None = None):
        self.root, self.port = Path(root), port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.artifacts = self.root / "artifacts"
        self.log_path = self.root / "server.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> "MlflowServer":
        command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                   f"sqlite:///{self.root}/srv.db", "--artifacts-destination", str(self.artifacts),
                   "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # its job runner delays shutdown
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, cwd=self.root, env=env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            preexec_fn=_die_with_parent)
        _STARTED.append(self)
        return self

    def wait_until_healthy(self, timeout: float = 120) -> "MlflowServer":
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=1)
                return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(self.log_path.read_text()[-3000:])
                time.sleep(0.3)

    def stop(self) -> None:
        """Stops the server and its workers (its own process group)."""
        if self in _STARTED:
            _STARTED.remove(self)
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()
        self.process = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the port is free again
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    time.sleep(0.2)
            except OSError:
                return


class MlflowUi(MlflowServer):
    """`mlflow ui` as a command printed by the product (`mlflow ui --backend-store-uri … --port 5000`),
    run on a free port of loopback instead of its --port."""

    def __init__(self, command: str, root: Path, port: int | None = None):
        super().__init__(root, port)
        words = command.split()
        assert words[:2] == ["mlflow", "ui"] and "--port" in words, command
        at = words.index("--port")
        self.command = [sys.executable, "-m", *words[:at], *words[at + 2:], "--host", "127.0.0.1",
                        "--port", str(self.port), "--workers", "1"]

    def start(self) -> "MlflowUi":
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, cwd=self.root, env=env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            preexec_fn=_die_with_parent)
        _STARTED.append(self)
        return self
