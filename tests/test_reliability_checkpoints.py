"""Reliability of checkpoints (issue 24, cases 2, 3, 5, 12, 15): no checkpoint runs code when loaded,
one URL's file is never another's, a truncated download is never trusted, a read-only cache of
verified files is usable, a redirect loop or Ctrl-C during a download is one line.

Through the real commands (`python -m harness.launch`, `.train`, `.fetch`) and `models.load_weights`
(what a job calls), against a real HTTP server on 127.0.0.1 and a real read-only mount.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.server
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import models
from harness import checkpointing
from harness.unpickle import UnsafeCheckpoint, allowed
from models.checkpoint import CheckpointError, cached_path, fetch, read_record, record_path
from tests.test_reliability import REPO, Ctx, cli, snapshot, teacher_only, write

TINY_TEACHER = REPO / "checkpoints" / "tiny_teacher_dense.pth"

# a route's answer: bytes (sent with a Content-Length), or a function that writes the response itself
Answer = bytes | Callable[[http.server.BaseHTTPRequestHandler], None]


class Site:
    """A real HTTP server on 127.0.0.1 (in a thread) answering `routes[path with query]`; 404 else."""

    def __init__(self) -> None:
        self.routes: dict[str, Answer] = {}
        self.release = threading.Event()  # lets a stalled answer finish when the test ends
        routes = self.routes

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                answer = routes.get(self.path)
                if answer is None:
                    self.send_error(404)
                elif callable(answer):
                    answer(self)
                else:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> Site:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    monkeypatch.setenv("DVIT_CACHE", str(tmp_path / "cache"))
    with Site() as server:
        yield server


def checkpoint_bytes(tmp: Path, obj: object, name: str, **save: object) -> bytes:
    path = tmp / name
    torch.save(obj, path, **save)
    return path.read_bytes()


def evil(marker: Path) -> object:
    """What the issue's probe saved: unpickling it runs `touch MARKER`."""

    class Evil:
        def __reduce__(self) -> tuple:
            return os.system, (f"touch {marker}",)

    return {"model": {}, "x": Evil()}


def fetch_cli(tmp: Path, *args: str, **popen: object) -> subprocess.CompletedProcess:
    return cli("harness.fetch", *args, cwd=tmp, env={"DVIT_CACHE": str(tmp / "cache")}, **popen)


def error_lines(stderr: str) -> list[str]:
    """stderr without the progress bar (tqdm's `download NAME: ...`) and fetch's summary line."""
    return [
        line
        for line in stderr.replace("\r", "\n").splitlines()
        if line.strip() and not line.startswith(("download ", "checkpoints in "))
    ]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------- case 2: no checkpoint runs code
@pytest.mark.parametrize("field", ["model.pretrained", "teacher.checkpoint", "train.init_from"])
def test_the_launcher_refuses_a_checkpoint_that_would_run_code(tmp_path: Path, field: str) -> None:
    marker = tmp_path / "MARKER"
    weights = tmp_path / "w" / "evil.pth"
    weights.parent.mkdir()
    torch.save(evil(marker), weights)
    section, key = field.split(".")
    spec = str(write(tmp_path / "spec.yaml", teacher_only(**{f"stages/teacher/{section}/{key}": str(weights)})))
    before = snapshot(tmp_path)
    result = cli(*Ctx(tmp_path, tmp_path).launch(spec), cwd=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert f"{field}: refused: unpickling it would import posix.system" in lines[0] and str(weights) in lines[0]
    assert snapshot(tmp_path) == before and not marker.exists()  # nothing submitted, nothing run


def test_a_job_never_unpickles_code_from_a_url_a_file_or_its_run_folder(tmp_path: Path, site: Site) -> None:
    """The job's own loads, behind the launcher's check: `harness.train` with an http URL (fetched
    by the job) and with an evil `checkpoint.pth` in its run folder; `models.load_weights` (what
    model.pretrained / teacher.checkpoint / train.init_from go through) with the file in torch's
    zip format, pickle protocol 4 and the legacy format."""
    marker = tmp_path / "MARKER"
    site.routes["/zoo/evil.pth"] = checkpoint_bytes(tmp_path, evil(marker), "served.pth")
    url = f"{site.url}/zoo/evil.pth"
    env = {"DVIT_CACHE": str(tmp_path / "cache")}
    config = Ctx(tmp_path, tmp_path).train_cfg(**{"model/pretrained": url})
    result = cli("harness.train", config, cwd=tmp_path, env=env)
    lines = [line for line in error_lines(result.stderr) if not line.startswith("output_dir:")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert url in lines[0] and "refused: unpickling it would import posix.system" in lines[0]
    cached = [p.name for p in (tmp_path / "cache" / "checkpoints").iterdir() if not p.name.endswith(".lock")]
    assert cached == []  # neither cached nor recorded

    run_dir = tmp_path / "resume"
    run_dir.mkdir()
    torch.save(evil(marker), run_dir / "checkpoint.pth")  # a resume point someone placed in the run folder
    config = Ctx(tmp_path, tmp_path).train_cfg(output_dir=str(run_dir))
    result = cli("harness.train", config, cwd=tmp_path, env=env)
    lines = error_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert str(run_dir / "checkpoint.pth") in lines[0] and "posix.system" in lines[0]

    model = timm.create_model("dynamicvit_tiny_patch8_64", variant="dense")
    for name, save in (
        ("zip.pth", {}),
        ("protocol4.pth", {"pickle_protocol": 4}),
        ("legacy.pth", {"_use_new_zipfile_serialization": False}),
    ):
        torch.save(evil(marker), tmp_path / name, **save)
        with pytest.raises(UnsafeCheckpoint) as caught:
            models.load_weights(model, str(tmp_path / name))
        message = str(caught.value)
        assert "\n" not in message and str(tmp_path / name) in message and "posix.system" in message, message
    assert not marker.exists()


def test_official_files_extra_objects_are_admitted_by_name(tmp_path: Path) -> None:
    """The official training scripts save `args` (argparse.Namespace) beside the weights, timm's a
    numpy `metric`: admitted by name, loaded with weights_only; every shipped checkpoint loads."""
    model = timm.create_model("dynamicvit_tiny_patch8_64", variant="dense")
    weights = torch.load(TINY_TEACHER, weights_only=True)["model"]
    official = tmp_path / "official.pth"
    torch.save(
        {
            "model": weights,
            "epoch": 29,
            "metric": np.float64(66.2),
            "args": argparse.Namespace(lr=1e-3, input_size=64, model="dynamicvit", drop=(0.0, None)),
        },
        official,
    )
    assert models.load_weights(model, str(official)) == []
    for path in sorted((REPO / "checkpoints").glob("*.pth")):
        assert models.read_state_dict(str(path)), path
    # the launcher's standard-library check agrees with torch's own allowlist
    assert all(allowed(name) for name in torch._weights_only_unpickler._get_allowed_globals())
    assert not any(
        allowed(name)
        for name in (
            "torch.load",
            "torch.hub.load",
            "torch.jit.load",
            "builtins.eval",
            "posix.system",
            "torch.serialization.load",
            "numpy.load",
        )
    )


def test_training_checkpoints_resume_with_weights_only(tmp_path: Path) -> None:
    """The project's own checkpoints hold no pickled numpy state: weights_only reads them back and
    the RNGs continue exactly; one written before (numpy arrays) still loads."""
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    state = {"rng": checkpointing.rng_state(), "epoch": 1, "sums": {"sums": {"loss": 1.5}, "count": 2}}
    expected = (np.random.rand(3), random.random(), torch.rand(2))
    checkpointing.save_atomic(state, tmp_path / "checkpoint.pth")
    torch.load(tmp_path / "checkpoint.pth", weights_only=True)  # no admitted type needed
    loaded = checkpointing.load(tmp_path / "checkpoint.pth")
    checkpointing.restore_rng(loaded["rng"])
    again = (np.random.rand(3), random.random(), torch.rand(2))
    assert np.array_equal(again[0], expected[0]) and again[1] == expected[1] and torch.equal(again[2], expected[2])

    old = dict(state, rng=dict(state["rng"], numpy=np.random.get_state()))  # before issue 24
    torch.save(old, tmp_path / "old.pth")
    checkpointing.restore_rng(checkpointing.load(tmp_path / "old.pth")["rng"])


# ------------------------------------------------------------- case 3: one URL, one file
def test_the_cache_keys_files_by_the_whole_url(tmp_path: Path, site: Site) -> None:
    files = {
        path: checkpoint_bytes(tmp_path, {"model": {"w": torch.full((4,), float(i))}}, f"{i}.pth")
        for i, path in enumerate(["/a/model.pth", "/b/model.pth", "/uc?id=A", "/uc?id=B"])
    }
    site.routes.update(files)
    site.routes["/c/model.pth.sha256.json"] = b'{"url": "x", "sha256": "' + b"0" * 64 + b'"}\n'
    urls = [site.url + path for path in files]
    # a URL named like the cache's own record is a download like any other: not a checkpoint, not cached
    record_like = f"{site.url}/c/model.pth.sha256.json"
    result = fetch_cli(tmp_path, *urls, record_like)
    printed = [line.split("  ") for line in result.stdout.splitlines()]
    assert [source for _, _, source in printed] == urls
    assert len({path for _, path, _ in printed}) == 4  # four URLs, four files
    for (digest, path, source), data in zip(printed, files.values(), strict=True):
        assert Path(path).read_bytes() == data and digest == sha256(data)
        assert read_record(Path(path))["url"] == source
    (line,) = error_lines(result.stderr)
    assert result.returncode == 1 and line.startswith(f"checkpoint: {record_like}: the file is not a torch checkpoint")
    assert not cached_path(record_like).exists()
    # a file recorded for another URL is refused, never returned
    first, second = Path(printed[0][1]), Path(printed[1][1])
    record_path(second).write_text(record_path(first).read_text())
    second.write_bytes(first.read_bytes())
    with pytest.raises(CheckpointError, match=f"recorded as the download of '{urls[0]}', not of {urls[1]}"):
        fetch(urls[1])
    # a file placed in the cache by hand is checked like a download before its hash is recorded
    placed = cached_path(f"{site.url}/placed.pth")
    torch.save(evil(tmp_path / "MARKER"), placed)
    with pytest.raises(
        UnsafeCheckpoint, match=r"placed in the cache for .*, but refused: unpickling it would import posix\.system"
    ):
        fetch(f"{site.url}/placed.pth")
    assert not record_path(placed).exists() and not (tmp_path / "MARKER").exists()


# ------------------------------------------------------- case 5 and 15: downloads that go wrong
def test_a_truncated_download_or_a_redirect_loop_is_one_line_and_nothing_is_cached(tmp_path: Path, site: Site) -> None:
    data = TINY_TEACHER.read_bytes()

    def closes_early(handler: http.server.BaseHTTPRequestHandler) -> None:  # no Content-Length, then EOF
        handler.send_response(200)
        handler.end_headers()
        handler.wfile.write(data[: len(data) // 2])
        handler.close_connection = True

    def loops(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(302)
        handler.send_header("Location", "/loop.pth")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    site.routes.update({"/teacher.pth": closes_early, "/loop.pth": loops})
    url, loop = f"{site.url}/teacher.pth", f"{site.url}/loop.pth"
    result = fetch_cli(tmp_path, url, loop)
    lines = error_lines(result.stderr)
    assert result.returncode == 1 and len(lines) == 2, result.stderr
    assert lines[0].startswith(f"checkpoint: {url}: the file is a truncated or damaged checkpoint")
    assert "nothing was cached, try again" in lines[0]
    assert lines[1].startswith(f"checkpoint: could not download {loop} (the server redirects in a loop")
    cache = tmp_path / "cache" / "checkpoints"
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == []  # no file, no record
    site.routes["/teacher.pth"] = data  # the server is fixed: the next try fetches it
    assert fetch(url) == cached_path(url) and read_record(cached_path(url))["sha256"] == sha256(data)


def test_ctrl_c_during_a_download_is_one_line_and_leaves_no_part_file(tmp_path: Path, site: Site) -> None:
    def stalls(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(10 << 20))
        handler.end_headers()
        handler.wfile.write(b"PK" + bytes(64 << 10))  # then nothing: the client waits in its read
        handler.wfile.flush()
        site.release.wait(60)

    site.routes["/big.pth"] = stalls
    url = f"{site.url}/big.pth"
    env = {**os.environ, "PYTHONPATH": str(REPO), "DVIT_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.fetch", url],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    part = cached_path(url).with_name(f".{cached_path(url).name}.{proc.pid}.part")
    deadline = time.monotonic() + 60
    while not part.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert part.exists(), "the download never started"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and error_lines(err) == ["harness.fetch: interrupted"], err
    assert not list(part.parent.glob(".*.part")) and not cached_path(url).exists()


# ------------------------------------------------------------- case 12: a read-only cache
@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """`folder` read-only: a read-only bind mount as root (root ignores permission bits), else chmod."""
    if os.geteuid() == 0:
        if subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True).returncode:
            pytest.skip("running as root without `mount`: no read-only folder to test with")
        try:
            subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], check=True, capture_output=True)
            yield
        finally:
            subprocess.run(["umount", str(folder)], check=False)
    else:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)


def test_a_read_only_cache_of_verified_files_is_used_and_a_missing_file_is_one_line(tmp_path: Path, site: Site) -> None:
    data = TINY_TEACHER.read_bytes()
    site.routes.update({"/teacher.pth": data, "/other.pth": data})
    url, missing = f"{site.url}/teacher.pth", f"{site.url}/other.pth"
    cached = fetch(url)  # a shared cache, filled by someone else
    (cached.parent / f"{cached.name}.lock").unlink(missing_ok=True)
    with read_only(cached.parent):
        result = fetch_cli(tmp_path, url, missing)
    assert result.stdout == f"{sha256(data)}  {cached}  {url}\n"  # used as it is: verified, nothing written
    (line,) = error_lines(result.stderr)
    assert result.returncode == 1 and result.stderr.rstrip().endswith("1 ok, 1 failed")
    assert line.startswith(f"checkpoint: {cached.parent}: the checkpoint cache cannot be written") and missing in line


# ------------------------------------------------- review L5: fetch checks a local file like a download
def test_fetch_refuses_a_local_file_that_would_run_code_and_a_missing_one_as_bad_input(tmp_path: Path) -> None:
    """A local file goes through the same check as a download (nothing is unpickled): one whose pickle
    would call os.system is refused, not reported "ok"; a missing one is the user's input too: exit 2."""
    marker = tmp_path / "MARKER"
    bad, missing = tmp_path / "evil.pth", tmp_path / "nope.pth"
    torch.save(evil(marker), bad)
    result = fetch_cli(tmp_path, str(TINY_TEACHER), str(bad), str(missing))
    lines = error_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 2, result.stderr
    assert lines[0].startswith(f"checkpoint: {bad}: refused: unpickling it would import posix.system"), lines
    assert lines[1] == f"checkpoint: {missing}: no such file", lines
    printed = [line.split("  ") for line in result.stdout.splitlines()]
    assert printed == [[sha256(TINY_TEACHER.read_bytes()), str(TINY_TEACHER), str(TINY_TEACHER)]]
    assert "1 ok, 2 failed" in result.stderr and not marker.exists()


# ------------------------------------------ review L7: a cache that cannot take the download is not "offline"
def test_a_full_or_unwritable_cache_during_a_download_names_the_cache_not_the_network(
    tmp_path: Path, site: Site
) -> None:
    """The file cannot be written into the cache (as root: a 64 KiB tmpfs, full before the 3.5 MB checkpoint
    is in; else a folder without write permission that holds only the lock file): one line naming the cache
    folder and the problem, exit 1 (the environment), no "offline" advice and no partial file."""
    site.routes["/teacher.pth"] = TINY_TEACHER.read_bytes()
    url = f"{site.url}/teacher.pth"
    cache = cached_path(url).parent
    cache.mkdir(parents=True)
    with contextlib.ExitStack() as stack:
        if os.geteuid() == 0:
            mount = ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(cache)]
            if subprocess.run(mount, capture_output=True).returncode:
                pytest.skip("running as root without `mount`: no small file system to fill")
            stack.callback(subprocess.run, ["umount", str(cache)], check=False)
            problem = "no space left on the device (disk full)"
        else:
            Path(f"{cached_path(url)}.lock").touch()  # the lock can be taken; the download cannot be written
            cache.chmod(0o555)
            stack.callback(cache.chmod, 0o755)
            problem = "Permission denied"
        result = fetch_cli(tmp_path, url)
        leftovers = sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock"))
    (line,) = error_lines(result.stderr)
    assert result.returncode == 1 and line.startswith(f"checkpoint: {cache}: {problem}"), result.stderr
    assert url in line and "offline" not in line and "DVIT_CACHE" in line
    assert leftovers == []  # no .part file, no record


# -------------------------------------- review 2 L1: Ctrl-C to a run trained by hand before its first checkpoint
def test_ctrl_c_before_the_first_checkpoint_says_the_same_command_starts_over(tmp_path: Path) -> None:
    """SIGINT (Ctrl-C) to `python -m harness.train` during its first epoch, before the checkpoint written at
    the epoch's end: there is nothing to resume, so the KILLED run's `error` says that the same command
    starts over (in a new MLflow run), not that it resumes from the last checkpoint."""
    from mlflow import MlflowClient

    config = Ctx(tmp_path, tmp_path).train_cfg(
        **{"data/train_size": 4096, "train/batch_size": 2, "optim/log_every": 1}
    )  # an epoch of 2,048 steps: far longer than the wait for its first logged step
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.train", config],
        cwd=tmp_path,
        env={k: v for k, v in env.items() if not k.startswith("MLFLOW_")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def logged() -> bool:  # read with sqlite3: an MLflow client here would race the job setting up the store
        try:
            with contextlib.closing(sqlite3.connect(f"file:{tmp_path / 'mlflow.db'}?mode=ro", uri=True)) as con:
                return bool(con.execute("select count(*) from metrics").fetchone()[0])
        except sqlite3.Error:
            return False

    deadline = time.monotonic() + 240
    while not logged() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert logged(), "the run never logged a step"
    checkpoint = tmp_path / "run" / checkpointing.CHECKPOINT
    assert not checkpoint.exists()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert not checkpoint.exists()  # interrupted before the first epoch's end, as intended
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "KILLED", run.info.status
    assert run.data.tags["error"] == (
        "interrupted: Ctrl-C (SIGINT) before the first checkpoint (written at each epoch's end); the same "
        "command starts over, in a new MLflow run"
    ), run.data.tags


# ---------------------------- review 2 L2: a disk that fills on the last buffered bytes of a download
def test_a_cache_that_fills_on_the_last_buffered_bytes_names_the_cache_not_the_network(
    tmp_path: Path, site: Site
) -> None:
    """A 6,000-byte download fits Python's 8 KiB write buffer: it reaches the disk only at the final flush,
    which a one-page (4 KiB) tmpfs cuts short; the file's close then fails on the same bytes. Still one line
    naming the cache folder and the full disk, exit 1, no "offline" advice and no partial file (the close's
    plain OSError had replaced the cache's error)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a one-page tmpfs (a full disk on the final flush)")
    site.routes["/small.pth"] = b"PK" + bytes(5998)
    url = f"{site.url}/small.pth"
    cache = cached_path(url).parent
    cache.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(cache)], capture_output=True).returncode:
        pytest.skip("running as root without `mount`: no small file system to fill")
    try:
        result = fetch_cli(tmp_path, url)
        leftovers = sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock"))
    finally:
        subprocess.run(["umount", str(cache)], check=False)
    (line,) = error_lines(result.stderr)
    assert result.returncode == 1, result.stderr
    assert line.startswith(f"checkpoint: {cache}: no space left on the device (disk full)"), line
    assert url in line and "offline" not in line and "DVIT_CACHE" in line
    assert leftovers == []
