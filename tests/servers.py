"""Real servers for tests: an `mlflow server` on a free local port, stopped by its own pid.

Usage (start it once per module, it takes about 10 s):

    from tests.servers import mlflow_server

    @pytest.fixture(scope="module")
    def mlflow_uri(tmp_path_factory):
        with mlflow_server(tmp_path_factory.mktemp("mlflow")) as server:
            yield server.uri
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class MlflowServer:
    uri: str  # http://127.0.0.1:PORT
    pid: int
    root: Path  # holds mlflow.db, artifacts/ and server.log
    log: Path


def free_port() -> int:
    """A port the OS just handed out (tiny race with other processes, fine for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    """Terminate the server's process group (it forks workers), then kill what is left.

    The grace is short: uvicorn waits for idle keep-alive connections, which tests don't need.
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # workers may outlive a leader that already exited
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


@contextlib.contextmanager
def mlflow_server(
    root: Path, *, timeout_s: float = 60.0, workers: int = 1, stop_grace_s: float = 3.0, port: int = 0
) -> Iterator[MlflowServer]:
    """Run `mlflow server` with a SQLite store under `root` until the block ends.

    `port`: 0 picks a free one; give an earlier server's port and root to restart it (outage tests).
    The server leads its own process group (`os.killpg(server.pid, SIGSTOP)` freezes it whole).

    Waits for `/health` at most `timeout_s`; on timeout or early exit it fails with the log.
    One worker by default: it starts faster, serves concurrent clients from its thread pool, and
    here answered keep-alive requests in ~10 ms where 2-4 workers took ~50 ms each.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = root / "server.log"
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{root.resolve() / 'mlflow.db'}",
        "--default-artifact-root", str(root.resolve() / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
    # no GenAI job runner: its 8 huey consumer processes are of no use to these tests, and cost CPU
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"mlflow server not healthy after {timeout_s} s:\n{log.read_text()}")
            time.sleep(0.25)
        yield MlflowServer(uri=uri, pid=proc.pid, root=root, log=log)
    finally:
        _stop(proc, stop_grace_s)


def shell_exports(printed: str) -> dict[str, str]:
    """The variables the `export NAME=...` lines of `printed` (what `scripts/tracking-server.sh start|status`
    prints) give a shell that evals them: bash evaluates them, so a `"$(cat FILE)"` value is read as a user's
    `eval "$(...)"` would read it."""
    lines = [line for line in printed.splitlines() if line.startswith("export ")]
    names = [line[len("export ") :].split("=", 1)[0] for line in lines]
    show = 'for name in "$@"; do printf "%s=%s\\0" "$name" "${!name}"; done'
    result = subprocess.run(
        ["bash", "-c", "\n".join([*lines, show]), "bash", *names], capture_output=True, text=True, check=True
    )
    return dict(item.split("=", 1) for item in result.stdout.split("\0") if item)
