"""The model zoo: checkpoint download into the cache (against a real HTTP server on 127.0.0.1),
sha256 recorded and checked, clear errors offline; experiments/zoo.yaml at the tiny scale end to
end through the launcher, MLflow and the notebook; its paper scale expanded (dry run)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import jupytext
import pandas as pd
import pytest
import timm
import torch
import yaml
from mlflow import MlflowClient

import models
from analysis import collect, zoo_table
from analysis.reference import load_reference
from harness.fetch import spec_sources
from harness.spec import load_and_expand
from models.checkpoint import CheckpointError, cache_name, cached_path, fetch, read_record, record_path

REPO = Path(__file__).resolve().parents[1]
TINY_DYNAMIC = REPO / "checkpoints" / "tiny_dynamicvit_0.7.pth"
OFFICIAL_HOST = "https://cloud.tsinghua.edu.cn/f/"


# ------------------------------------------------------------------------------- servers
class FileServer:
    """`http.server` over one folder on 127.0.0.1 in a thread; counts the GET requests per path."""

    def __init__(self, root: Path) -> None:
        self.requests: list[str] = []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args: object) -> None:  # keep the test output clean
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@contextlib.contextmanager
def silent_server() -> Iterator[str]:
    """A port that accepts connections (the kernel's backlog) but never answers: a stalled network."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def closed_port_url() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/zoo/gone.pth"  # nobody listens there any more: refused, as offline


@pytest.fixture()
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FileServer]:
    """The tiny DynamicViT checkpoint served over HTTP; an empty checkpoint cache in DVIT_CACHE."""
    (tmp_path / "www" / "zoo").mkdir(parents=True)
    shutil.copy(TINY_DYNAMIC, tmp_path / "www" / "zoo" / TINY_DYNAMIC.name)
    monkeypatch.setenv("DVIT_CACHE", str(tmp_path / "cache"))
    with FileServer(tmp_path / "www") as server:
        yield server


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tiny_model() -> torch.nn.Module:
    return timm.create_model("dynamicvit_tiny_patch8_64", keep_ratio=0.7)


# -------------------------------------------------------------------------- download path
def test_first_download_records_the_hash_and_later_uses_hit_the_cache(
    served: FileServer, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    url = f"{served.url}/zoo/{TINY_DYNAMIC.name}"
    model = tiny_model()
    assert models.load_weights(model, url) == []  # downloaded; every key, the predictors too, loaded
    target = cached_path(url)
    assert target.parent == tmp_path / "cache" / "checkpoints"
    assert served.requests == [f"/zoo/{TINY_DYNAMIC.name}"]
    assert sha256(target) == sha256(TINY_DYNAMIC)
    record = json.loads(record_path(target).read_text())
    assert record["sha256"] == sha256(TINY_DYNAMIC) and record["url"] == url and record["how"] == "downloaded"
    assert record["bytes"] == TINY_DYNAMIC.stat().st_size
    err = capsys.readouterr().err
    assert f"download {TINY_DYNAMIC.name}: 100%" in err and "3.69M/3.69M" in err  # the progress bar

    again = tiny_model()
    models.load_weights(again, url)  # the cache: verified, not downloaded again
    assert served.requests == [f"/zoo/{TINY_DYNAMIC.name}"]
    assert "download" not in capsys.readouterr().err
    reference = torch.load(TINY_DYNAMIC, weights_only=True)["model"]
    for model_ in (model, again):
        assert torch.equal(
            model_.state_dict()["score_predictor.2.out_conv.4.weight"], reference["score_predictor.2.out_conv.4.weight"]
        )
    assert not list(target.parent.glob(".*.part"))


def test_a_corrupted_cache_file_is_refused_naming_file_and_hashes(served: FileServer, tmp_path: Path) -> None:
    url = f"{served.url}/zoo/{TINY_DYNAMIC.name}"
    target = fetch(url)
    good = sha256(target)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: torch could still load it
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as caught:
        fetch(url)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"checkpoint: {target}: sha256 mismatch: expected {good}")
    assert f"got {hashlib.sha256(data).hexdigest()}" in message and url in message
    assert served.requests == [f"/zoo/{TINY_DYNAMIC.name}"]  # nothing fetched behind the user's back
    target.unlink()  # what the message says to do (the record stays: the new download replaces it)
    assert sha256(fetch(url)) == good and len(served.requests) == 2


def test_a_pinned_hash_is_checked_on_download_and_in_the_cache(served: FileServer, tmp_path: Path) -> None:
    url = f"{served.url}/zoo/{TINY_DYNAMIC.name}"
    wrong = "0" * 64
    with pytest.raises(
        CheckpointError,
        match=f"sha256 mismatch: expected {wrong} \\(pinned in the URL\\), "
        f"got {sha256(TINY_DYNAMIC)}; nothing was cached",
    ):
        fetch(f"{url}#sha256={wrong}")
    target = cached_path(url)
    assert not target.exists() and not list(target.parent.glob(".*.part"))
    assert fetch(f"{url}#sha256={sha256(TINY_DYNAMIC).upper()}") == target  # pins are case-insensitive
    with pytest.raises(CheckpointError, match=f"expected {wrong} \\(pinned in {url}\\)"):
        fetch(f"{url}#sha256={wrong}")  # a cached file must match a pin too
    with pytest.raises(CheckpointError, match="a URL fragment must be #sha256=<64 hex digits>, got #md5=1"):
        fetch(f"{url}#md5=1")


def test_a_file_placed_by_hand_is_used_and_its_hash_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("DVIT_CACHE", str(tmp_path / "cache"))
    url = closed_port_url().replace("gone.pth", TINY_DYNAMIC.name)  # offline: the file comes by hand
    target = cached_path(url)
    target.parent.mkdir(parents=True)
    shutil.copy(TINY_DYNAMIC, target)
    assert fetch(url) == target
    record = read_record(target)
    assert record is not None and record["sha256"] == sha256(TINY_DYNAMIC) and record["how"] == "found in the cache"
    assert f"recorded sha256 {sha256(TINY_DYNAMIC)} (first use)" in capsys.readouterr().err


def test_offline_is_one_clear_line_and_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DVIT_CACHE", str(tmp_path / "cache"))
    url = closed_port_url()
    target = cached_path(url)
    started = time.monotonic()
    with pytest.raises(CheckpointError) as caught:
        models.load_weights(tiny_model(), url)
    message = str(caught.value)
    assert time.monotonic() - started < 5 and "\n" not in message
    assert message.startswith(f"checkpoint: could not download {url} (ConnectionRefusedError")
    assert "this machine may be offline" in message and f"place it at {target}" in message
    assert not target.exists() and not list(target.parent.glob(".*.part"))


def test_a_stalled_server_times_out_and_a_404_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DVIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DVIT_DOWNLOAD_TIMEOUT", "1")
    with silent_server() as base:
        started = time.monotonic()
        with pytest.raises(CheckpointError, match=r"could not download .*(timed out|TimeoutError).*offline"):
            fetch(f"{base}/zoo/slow.pth")
        assert time.monotonic() - started < 5
    (tmp_path / "www").mkdir()
    with FileServer(tmp_path / "www") as server:
        with pytest.raises(CheckpointError, match=r"\(the server answered HTTP 404 File not found\): download it"):
            fetch(f"{server.url}/zoo/absent.pth")


def test_cache_names_of_the_official_links() -> None:
    """The URL's file name (or host-id) and a hash of the whole URL: two URLs never share a file."""
    deit = "https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth"
    tsinghua = "https://cloud.tsinghua.edu.cn/f/698896dfbcea430b9591/?dl=1"
    assert cache_name(deit) == f"deit_small_patch16_224-cd65a155-{hashlib.sha256(deit.encode()).hexdigest()[:12]}.pth"
    assert (
        cache_name(tsinghua)
        == f"cloud.tsinghua.edu.cn-698896dfbcea430b9591-{hashlib.sha256(tsinghua.encode()).hexdigest()[:12]}"
    )


def test_prefetch_cli_prints_hash_and_path_or_one_error_line(served: FileServer, tmp_path: Path) -> None:
    url, gone = f"{served.url}/zoo/{TINY_DYNAMIC.name}", closed_port_url()
    env = {**os.environ, "DVIT_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-m", "harness.fetch", url, gone],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr  # one of the two failed
    target = tmp_path / "cache" / "checkpoints" / cache_name(url)
    assert result.stdout == f"{sha256(TINY_DYNAMIC)}  {target}  {url}\n"
    assert read_record(target)["sha256"] == sha256(TINY_DYNAMIC)
    errors = [line for line in result.stderr.splitlines() if line.startswith("checkpoint: ")]
    assert len(errors) == 1 and errors[0].startswith(f"checkpoint: could not download {gone}")
    assert result.stderr.rstrip().endswith("1 ok, 1 failed")


# ---------------------------------------------------------------------------- the spec
# every official checkpoint: (registered model, keep ratio) by zoo row
OFFICIAL_ZOO = {
    "deit-256/0.7": ("dynamicvit_deit_256_patch16_224", 0.7),
    "deit-s/0.7": ("dynamicvit_deit_small_patch16_224", 0.7),
    "deit-b/0.7": ("dynamicvit_deit_base_patch16_224", 0.7),
    "lvvit-s/0.5": ("dynamicvit_lvvit_small_patch16_224", 0.5),
    "lvvit-s/0.7": ("dynamicvit_lvvit_small_patch16_224", 0.7),
    "lvvit-m/0.7": ("dynamicvit_lvvit_medium_patch16_224", 0.7),
    **{
        f"convnext-{s}/{r}": (f"dynamicconvnext_{size}", r)
        for s, size in (("t", "tiny"), ("s", "small"), ("b", "base"))
        for r in (0.7, 0.9)
    },
    **{
        f"swin-{s}/0.7": (f"dynamicswin_{size}_patch4_window7_224", 0.7)
        for s, size in (("t", "tiny"), ("s", "small"), ("b", "base"))
    },
}


def test_paper_scale_is_the_whole_official_zoo_one_gpu_each(tmp_path: Path) -> None:
    imagenet = tmp_path / "ILSVRC2012"
    imagenet.mkdir()
    spec, root = str(REPO / "experiments" / "zoo.yaml"), f"scales.paper.data.root={imagenet}"
    dry = subprocess.run(
        [sys.executable, "-m", "harness.launch", spec, "--scale", "paper", "--dry-run", root],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert lines[0] == "zoo (paper): 15 runs in stages official"
    for row in OFFICIAL_ZOO:
        (line,) = [x for x in lines if x.startswith(f"official  {row.replace('/', '-')} ")]
        assert "1x1 GPU" in line
    urls = spec_sources(spec, "paper", [root])
    assert len(set(urls)) == 15 and all(u.startswith(OFFICIAL_HOST) and u.endswith("/?dl=1") for u in urls)
    runs = load_and_expand(spec, [root], scale="paper").runs
    assert {r.row: (r.config.model.name, r.config.model.keep_ratio) for r in runs} == OFFICIAL_ZOO
    zoo = load_reference("zoo")
    paper = zoo[(zoo["scale"] == "paper") & zoo["available"]].set_index("row")
    assert paper.loc["deit-s/0.7", ["top1", "top5", "gflops"]].tolist() == [79.316, 94.676, 2.9]
    assert paper.loc["deit-b/0.7", ["top1", "top5", "gflops"]].tolist() == [81.43, 95.46, 11.4]
    assert paper.loc["lvvit-m/0.7", ["top1", "top5", "gflops"]].tolist() == [83.816, 96.584, 8.5]
    assert paper.loc["convnext-t/0.9", ["top1", "top5", "gflops"]].tolist() == [82.06, 95.89, 3.9]
    assert paper.loc["swin-b/0.7", ["top1", "top5", "gflops"]].tolist() == [83.43, 96.45, 12.1]
    spatial = load_reference("spatial").set_index("row")  # the spatial table quotes the same zoo
    for row in paper.index[paper.index.str.startswith(("convnext-", "swin-"))]:
        assert (
            paper.loc[row, ["top1", "top5", "gflops"]].tolist() == spatial.loc[row, ["top1", "top5", "gflops"]].tolist()
        )
    table = zoo_table.build_zoo_table(collect.empty_runs(), "paper")  # nothing evaluated yet
    assert table["row"].tolist() == list(OFFICIAL_ZOO)
    assert set(table["status"]) == {"missing"}  # every backbone is built here: none "not available"
    assert "| deit-s/0.7 | DeiT-S | 0.7 | 79.316 | missing |" in zoo_table.to_markdown(table)


def test_an_official_lvvit_zoo_file_loads_strictly_as_the_job_loads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The zoo's files cannot be downloaded here. A file in the official layout (the official
    training script saves {"model": state_dict, ...}; LV-ViT's names are the official ones) is
    placed where the row's URL is cached, and the row's model is built as the job builds it
    (`timm.create_model(name, keep_ratio=..., checkpoint=URL)`, harness.engine.build_model): every
    tensor loads, predictors included. (Swin/ConvNeXt official layouts: tests/test_spatial_models.py.)"""
    imagenet = tmp_path / "ILSVRC2012"
    imagenet.mkdir()
    spec = str(REPO / "experiments" / "zoo.yaml")
    (run,) = [
        r
        for r in load_and_expand(spec, [f"scales.paper.data.root={imagenet}"], scale="paper").runs
        if r.row == "lvvit-s/0.5"
    ]
    name, keep_ratio, url = run.config.model.name, run.config.model.keep_ratio, run.config.model.pretrained
    torch.manual_seed(0)
    state = timm.create_model(name, keep_ratio=keep_ratio).state_dict()
    monkeypatch.setenv("DVIT_CACHE", str(tmp_path / "cache"))
    target = tmp_path / "cache" / "checkpoints" / cache_name(url)
    target.parent.mkdir(parents=True)
    torch.save({"model": state, "epoch": 29}, target)  # placed by hand: its hash is recorded at first use
    torch.manual_seed(1)
    model = timm.create_model(name, keep_ratio=keep_ratio, checkpoint=url)
    loaded = model.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    assert any(k.startswith("score_predictor.") for k in state) and model.num_keep == [98, 49, 24]
    assert read_record(target)["sha256"] == sha256(target)


def test_the_notebook_is_paired_and_parameterised() -> None:
    notebook = jupytext.read(REPO / "analysis" / "notebooks" / "zoo_notebook.ipynb")
    source = jupytext.read(REPO / "analysis" / "notebooks" / "zoo_notebook.py")
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    assert [c.source for c in notebook.cells] == [c.source for c in source.cells], "run jupytext --sync"
    (parameters,) = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    for key in ("tracking_uri", "experiment", "scale", "output_dir"):
        assert f"{key} = " in parameters.source, key


def launch_zoo(tmp: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """The real spec from a scratch folder holding the repository's checkpoints (the spec's relative paths)."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "harness.launch",
            str(REPO / "experiments" / "zoo.yaml"),
            "--scale",
            "tiny",
            "--executor",
            "local",
            "--output-root",
            str(tmp / "runs"),
            "--tracking-uri",
            f"sqlite:///{tmp}/mlflow.db",
            *args,
        ],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_tiny_zoo_end_to_end_reproduces_the_recorded_numbers(tmp_path: Path) -> None:
    """experiments/zoo.yaml at the tiny scale through the launcher, MLflow and the notebook. Three of its
    checkpoints are the repository's files (the spec's relative paths: nothing downloaded or cached); the
    fourth, tiny/0.7, takes the URL path in the same launch: served over HTTP, downloaded by its job into the
    cache, hash recorded (one launch instead of a second one for the URL: its jobs start in seconds each)."""
    (tmp_path / "checkpoints").symlink_to(REPO / "checkpoints")
    env = {**os.environ, "DVIT_CACHE": str(tmp_path / "cache")}
    env.pop("MLFLOW_TRACKING_URI", None)
    (tmp_path / "www").mkdir()
    shutil.copy(TINY_DYNAMIC, tmp_path / "www" / TINY_DYNAMIC.name)
    variants = yaml.safe_load((REPO / "experiments" / "zoo.yaml").read_text())["stages"]["project"]["runs"]["variants"]
    (by_url,) = [v for v in variants if v["row"] == "tiny/0.7"]
    assert by_url["set"]["model.pretrained"] == f"checkpoints/{TINY_DYNAMIC.name}"
    with FileServer(tmp_path / "www") as server:
        url = by_url["set"]["model.pretrained"] = f"{server.url}/{TINY_DYNAMIC.name}"
        result = launch_zoo(tmp_path, "--wait", f"stages.project.runs.variants={json.dumps(variants)}", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert server.requests == [f"/{TINY_DYNAMIC.name}"]  # downloaded once, by its job
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("zoo")
    runs = client.search_runs([experiment.experiment_id], "tags.kind = 'train'")
    assert sorted(r.data.tags["row"] for r in runs) == ["tiny-lvvit/0.7", "tiny-lvvit/1.0", "tiny/0.7", "tiny/1.0"]
    recorded = load_reference("zoo").set_index("row")
    for run in runs:
        row, metrics, params = run.data.tags["row"], run.data.metrics, run.data.params
        assert run.info.status == "FINISHED" and params["train.epochs"] == "0"
        assert (
            params["model.pretrained"]
            == {
                "tiny/1.0": "checkpoints/tiny_teacher_dense.pth",
                "tiny/0.7": url,
                "tiny-lvvit/1.0": "checkpoints/tiny_lvvit_dense.pth",
                "tiny-lvvit/0.7": "checkpoints/tiny_lvvit_dynamic_0.7.pth",
            }[row]
        )
        # a fixed file on fixed images: the numbers recorded when it was made (0.1 = two images of 2,000);
        # for tiny/0.7 the file as downloaded
        assert metrics["val/acc1"] == pytest.approx(recorded.loc[row, "top1"], abs=0.1), row
        assert metrics["val/acc5"] == pytest.approx(recorded.loc[row, "top5"], abs=0.1), row
        assert metrics["gflops"] == pytest.approx(recorded.loc[row, "gflops"], rel=1e-3), row
    table = pd.read_csv(tmp_path / "reports" / "zoo" / "tiny" / "zoo.csv").set_index("row")
    assert table["status"].tolist() == ["evaluated"] * 4
    by_row = {r.data.tags["row"]: r.data.metrics for r in runs}
    for row in (
        "tiny/1.0",
        "tiny/0.7",
        "tiny-lvvit/1.0",
        "tiny-lvvit/0.7",
    ):  # the notebook shows MLflow's numbers beside the recorded ones
        assert table.loc[row, zoo_table.ACC1_OURS] == pytest.approx(by_row[row]["val/acc1"])
        assert table.loc[row, zoo_table.ACC5_ZOO] == recorded.loc[row, "top5"]
    assert "| tiny/0.7 | tiny ViT | 0.7 | 61.6 |" in result.stdout  # the report printed by --wait
    # the cache holds the downloaded file, its hash recorded; the local files were neither copied nor downloaded
    cached = tmp_path / "cache" / "checkpoints" / cache_name(url)
    assert sorted(p.name for p in cached.parent.glob("*.pth")) == [cached.name]
    assert read_record(cached)["sha256"] == sha256(TINY_DYNAMIC)
