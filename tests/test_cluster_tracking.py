"""Cluster-grade tracking (issue 15 items 1, 2, 6): the PostgreSQL-backed `mlflow server` and Optuna
storage of scripts/tracking-server.sh, used by real SLURM jobs, by a 3-worker search whose worker
freezes mid-trial, and by 16 concurrent writers; a 2-node DDP job through SLURM (partition `multi` of
scripts/slurm-local.sh: two slurmd daemons on this host); the script's basic-auth mode (last: it restarts
the server's mlflow).

The server is the one `.ci/run` starts (`bash scripts/tracking-server.sh start`); the tests skip
when it is not running, as the SLURM tests skip without a cluster. Each test writes to its own
experiment and study, so that reruns against the same server do not see each other's data.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState

from tests.servers import shell_exports
from tests.test_launch import needs_slurm
from tests.test_search import spec_with

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "tracking-server.sh"


def server_status(env: dict[str, str] | None = None) -> tuple[int, dict[str, str]]:
    """`tracking-server.sh status`: its exit code and the variables its exports give a shell that evals them
    (the passwords are read from their files by that shell: the printed text holds none)."""
    result = subprocess.run(
        ["bash", str(SCRIPT), "status"], capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})}
    )
    return result.returncode, shell_exports(result.stdout)


@pytest.fixture(scope="module")
def server() -> Iterator[dict[str, str]]:
    """The exports of the running server; PGPASSWORD is in this process's environment while the module runs, as
    in a shell that evaluated them (Optuna here, the commands and SLURM jobs started from here, inherit it)."""
    code, exports = server_status()
    if code != 0 or "MLFLOW_TRACKING_URI" not in exports:
        pytest.skip("no tracking server (bash scripts/tracking-server.sh start)")
    if "MLFLOW_TRACKING_PASSWORD" in exports:
        pytest.skip("the tracking server runs with --auth: these tests expect the open one")
    assert ":" not in exports["OPTUNA_STORAGE"].split("@")[0].split("://")[1]  # no password in the printed URL
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PGPASSWORD", exports["PGPASSWORD"])
        yield exports


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.2) -> Any:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def cancel_jobs(prefix: str) -> None:
    """Cancel this test's SLURM jobs (their names start with the spec's name) after a failure."""
    listing = subprocess.run(["squeue", "-h", "-o", "%A %j"], capture_output=True, text=True).stdout
    ids = [line.split()[0] for line in listing.splitlines() if line.split()[1:2] and line.split()[1].startswith(prefix)]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True)


def pg_count(url: str, query: str, *args: Any) -> int:
    """A count straight from PostgreSQL (proof that the store is PostgreSQL, not a local file)."""
    import psycopg

    with psycopg.connect(url) as conn:
        return int(conn.execute(query, args).fetchone()[0])


# ----------------------------------------------------------------- (a) a SLURM launch logs to it
@pytest.mark.slurm
@needs_slurm
@pytest.mark.timeout(600)
def test_a_slurm_launch_logs_every_run_to_the_postgres_backed_server(tmp_path: Path, server: dict[str, str]) -> None:
    name = unique("cluster_launch")
    spec = {
        "name": name,
        "table": "sparsification-strategies",
        "default_scale": "tiny",
        "base": spec_with()["base"],
        "scales": {"tiny": {"slurm": {"cpus_per_task": 1, "timeout_min": 20}}},
        "stages": {
            "variants": {
                "runs": {
                    "variants": [
                        {"name": "dynamic", "row": "a/dynamic", "set": {"model.variant": "dynamic"}},
                        {"name": "static", "row": "a/static", "set": {"model.variant": "static"}},
                    ]
                }
            }
        },
    }
    spec["base"]["tracking"]["log_checkpoint"] = True  # an artifact through the served artifact store
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    uri = server["MLFLOW_TRACKING_URI"]
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "harness.launch",
                str(path),
                "--executor",
                "slurm",
                "--wait",
                "--output-root",
                str(tmp_path / "runs"),
                "--tracking-uri",
                uri,
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=540,
        )
    except subprocess.TimeoutExpired:
        cancel_jobs(name)
        raise
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id], "tags.kind = 'train'")
    assert {r.data.tags["row"] for r in runs} == {"a/dynamic", "a/static"}
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags["slurm_job_id"]
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc1")] == [0]
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # served by the server, not a local path
        assert client.list_artifacts(run.info.run_id), "no artifact reached the served store"
    mlflow_db = server["OPTUNA_STORAGE"].rsplit("/", 1)[0] + "/mlflow"
    every_run = client.search_runs([experiment.experiment_id])  # the train runs and the launch's parent run
    assert len(every_run) > len(runs)
    assert pg_count(
        mlflow_db,
        "SELECT count(*) FROM runs WHERE experiment_id = %s AND lifecycle_stage = 'active'",
        int(experiment.experiment_id),
    ) == len(every_run)  # (the deleted ones: the jobs' placeholders)


# ------------------------------------- (b) a 3-worker search on PostgreSQL with a frozen worker
@pytest.mark.slurm
@needs_slurm
@pytest.mark.timeout(600)
def test_search_with_three_slurm_workers_survives_a_frozen_worker(tmp_path: Path, server: dict[str, str]) -> None:
    """A worker is frozen (SIGSTOP) mid-trial: its heartbeat stops, the trial is failed and retried
    (RetryHeartbeatStaleTrialCallback), the frozen job is then killed, and the budget is still met."""
    name = unique("cluster_search")
    storage = server["OPTUNA_STORAGE"]
    spec = spec_with(
        trials=4,
        workers=3,
        objectives=["val/acc1"],
        pruner={"name": "none"},
        storage={"url": "${OPTUNA_STORAGE}", "heartbeat_interval": 1, "grace_period": 4},
    )
    spec["name"] = name
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    env = {**os.environ, "OPTUNA_STORAGE": storage}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "harness.search",
            str(path),
            "--executor",
            "slurm",
            "--output-root",
            str(tmp_path / "runs"),
            "--tracking-uri",
            server["MLFLOW_TRACKING_URI"],
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    rdb = optuna.storages.RDBStorage(storage)
    study_name = f"{name}-tiny"
    victim = None
    try:

        def training() -> Any:
            if proc.poll() is not None:
                raise AssertionError(f"the search ended early: {proc.communicate()[1][-3000:]}")
            try:
                trials = optuna.load_study(study_name=study_name, storage=rdb).get_trials(states=(TrialState.RUNNING,))
            except KeyError:  # the study is not created yet
                return None
            return next((t for t in trials if "mlflow_run_id" in t.user_attrs), None)

        victim = wait_for(training, 300, "a trial that trains")
        pid = int(victim.user_attrs["worker_pid"])
        os.kill(pid, signal.SIGSTOP)  # a frozen node: alive, but its heartbeat stops

        def failed_and_retried() -> bool:
            study = optuna.load_study(study_name=study_name, storage=rdb)
            retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == victim.number]
            return study.trials[victim.number].state == TrialState.FAIL and bool(retries)

        wait_for(failed_and_retried, 60, f"trial {victim.number} to be failed by its heartbeat and retried")
        os.kill(pid, signal.SIGKILL)  # SLURM then ends the job; the driver replaces the worker
        out, err = proc.communicate(timeout=420)
    except BaseException:
        proc.kill()
        cancel_jobs(name)
        raise
    assert proc.returncode == 0, err[-4000:]
    study = optuna.load_study(study_name=study_name, storage=rdb)
    assert len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == 4
    assert study.trials[victim.number].state == TrialState.FAIL
    (retry,) = [t for t in study.trials if t.system_attrs.get("failed_trial") == victim.number]
    assert retry.params == victim.params  # the same point, tried again
    # the retry ran on another worker (the victim was frozen, then killed); every worker is a SLURM array task
    assert retry.user_attrs["worker"] != victim.user_attrs["worker"]
    workers = {t.user_attrs["worker"] for t in study.trials if "worker" in t.user_attrs}
    assert len(workers) >= 2 and all("_" in w for w in workers), workers
    client = MlflowClient(server["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(name)
    trials = client.search_runs([experiment.experiment_id], "tags.kind = 'trial'")
    assert sum(r.data.tags.get("trial_state") == "COMPLETE" for r in trials) == 4
    assert client.get_run(victim.user_attrs["mlflow_run_id"]).info.status == "FAILED"
    (parent,) = client.search_runs([experiment.experiment_id], "tags.kind = 'search'")
    assert parent.data.tags["storage"] == "${OPTUNA_STORAGE}"  # as the spec wrote it: no password in MLflow
    assert parent.data.tags["storage_kind"] == "rdb" and server["PGPASSWORD"] not in out + err


# ----------------------------------------------------------------- (c) 16 concurrent writers
WRITERS, STEPS, TRIALS = 16, 25, 4

WRITER = textwrap.dedent("""
    import multiprocessing as mp, sys
    import optuna
    from mlflow import MlflowClient

    uri, storage, experiment_id, study_name, writers, steps, trials = sys.argv[1:8]
    writers, steps, trials = int(writers), int(steps), int(trials)

    def write(index, barrier):
        client = MlflowClient(uri)
        study = optuna.load_study(study_name=study_name, storage=storage)
        barrier.wait()  # every writer starts at once
        run = client.create_run(experiment_id, run_name=f"writer-{index}", tags={"writer": str(index)})
        client.log_param(run.info.run_id, "index", index)
        for step in range(steps):
            client.log_metric(run.info.run_id, "value", index * 1000 + step, step=step)
            if step < trials:
                trial = study.ask()
                trial.suggest_float("x", 0.0, 1.0)
                study.tell(trial, index * 1000 + step)
        client.set_terminated(run.info.run_id)

    ctx = mp.get_context("fork")  # one interpreter start for all 16 (2 cores), fresh connections in each
    barrier = ctx.Barrier(writers)
    procs = [ctx.Process(target=write, args=(i, barrier)) for i in range(writers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    sys.exit(max(p.exitcode or 0 for p in procs))
""")


@pytest.mark.timeout(300)
def test_sixteen_concurrent_writers_lose_nothing(server: dict[str, str]) -> None:
    uri, storage = server["MLFLOW_TRACKING_URI"], server["OPTUNA_STORAGE"]
    client = MlflowClient(uri)
    experiment_id = client.create_experiment(unique("cluster_writers"))
    study_name = unique("cluster_writers")
    optuna.create_study(study_name=study_name, storage=storage)
    result = subprocess.run(
        [sys.executable, "-c", WRITER, uri, storage, experiment_id, study_name, str(WRITERS), str(STEPS), str(TRIALS)],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = client.search_runs([experiment_id], max_results=100)
    assert sorted(int(r.data.tags["writer"]) for r in runs) == list(range(WRITERS))
    for run in runs:
        index = int(run.data.tags["writer"])
        history = client.get_metric_history(run.info.run_id, "value")
        assert sorted((m.step, m.value) for m in history) == [(s, index * 1000 + s) for s in range(STEPS)]
        assert run.info.status == "FINISHED" and run.data.params["index"] == str(index)
    study = optuna.load_study(study_name=study_name, storage=storage)
    assert sorted(t.value for t in study.trials) == sorted(i * 1000 + k for i in range(WRITERS) for k in range(TRIALS))
    assert {t.state for t in study.trials} == {TrialState.COMPLETE}
    assert len({t.number for t in study.trials}) == WRITERS * TRIALS


# ---------------------------------------------------------------------------- more than one node
def _ddp_rank(config: dict[str, Any]) -> dict[str, Any]:
    """One task of the 2-node job: `harness.job.TrainJob`, what `harness.launch` submits, trains through the
    engine (harness.distributed joins the process group from submitit's environment); returns what the
    test checks of this rank. Sent to the job by value: nothing here refers to this module."""
    import hashlib
    import os

    from harness import engine
    from harness.job import TrainJob

    trained: dict[str, Any] = {}
    fit = engine.Trainer.fit

    def keep(self: Any, *args: Any, **kwargs: Any) -> Any:
        trained["trainer"] = self
        return fit(self, *args, **kwargs)

    engine.Trainer.fit = keep
    final = TrainJob()(config)
    trainer = trained["trainer"]
    weights = hashlib.sha256()
    for name, value in sorted(trainer.model.state_dict().items()):
        weights.update(name.encode() + value.detach().cpu().contiguous().numpy().tobytes())
    return {
        "rank": trainer.env.rank,
        "world_size": trainer.env.world_size,
        "node": os.environ["SLURMD_NODENAME"],
        "job_nodes": os.environ["SLURM_JOB_NUM_NODES"],
        "weights": weights.hexdigest(),
        "final": final,
    }


MULTI = "multi"  # scripts/slurm-local.sh's partition of its two nodes (two slurmd daemons on this host)


def multi_partition_nodes() -> list[str]:
    out = subprocess.run(["sinfo", "-h", "-N", "-p", MULTI, "-o", "%N"], capture_output=True, text=True, timeout=30)
    return sorted(set(out.stdout.split())) if out.returncode == 0 else []


@pytest.mark.slurm
@needs_slurm
@pytest.mark.timeout(300)
def test_two_node_ddp_job_through_submitit(tmp_path: Path) -> None:
    """A real 2-node SLURM job (partition `multi`: two slurmd daemons on this host), submitted as
    harness.launch submits (make_executor with slurm nodes: 2, tasks_per_node: 1, the partition), one
    task a node: both ranks join one gloo process group (world size 2) from different SLURM nodes,
    train on half of the data each and end with identical weights; rank 0 alone logs one MLflow run."""
    from types import SimpleNamespace

    import cloudpickle

    from harness.launch import make_executor
    from harness.spec import SlurmResources
    from tests.test_engine import runs, write_config

    if len(multi_partition_nodes()) < 2:
        pytest.skip(f"no 2-node partition '{MULTI}' (restart the cluster: bash scripts/slurm-local.sh stop; ... start)")
    config = yaml.safe_load(
        write_config(tmp_path, "ddp2", train__epochs=1, optim__log_every=1, tracking__visualize_images=0).read_text()
    )
    # as harness.launch hands a run to its job: a SCHEDULED placeholder run, the folder bound to it;
    # rank 0 replaces it with the job's own run, rank 1 (started with the placeholder's id) follows
    from harness import runstate
    from harness.config import RunConfig
    from harness.tracking import ensure_experiment

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    cfg = RunConfig.model_validate(config)
    experiment_id = ensure_experiment(cfg.tracking.uri, cfg.tracking.experiment)
    placeholder = client.create_run(experiment_id, run_name="ddp2", tags={"run_key": cfg.run_key()}).info.run_id
    client.update_run(placeholder, status="SCHEDULED")
    runstate.claim(Path(cfg.output_dir), cfg.run_key(), placeholder)
    config["tracking"]["run_id"] = placeholder
    plan = SimpleNamespace(
        stage="ddp", slurm=SlurmResources(partition=MULTI, nodes=2, tasks_per_node=1, cpus_per_task=1, timeout_min=5)
    )
    executor = make_executor("slurm", tmp_path / "submitit", plan, "ddp2", [])
    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)  # the job need not import the tests
    try:
        job = executor.submit(_ddp_rank, config)
    finally:
        cloudpickle.unregister_pickle_by_value(module)
    try:
        wait_for(job.done, 240, f"2-node job {job.job_id}", poll_s=1)
        ranks = sorted(job.results(), key=lambda r: r["rank"])
    except BaseException:
        subprocess.run(["scancel", str(job.job_id)], capture_output=True)
        for log in sorted((tmp_path / "submitit").glob("*_log.*")):
            print(f"--- {log.name}\n{log.read_text()[-3000:]}")
        raise
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {2}
    assert {r["job_nodes"] for r in ranks} == {"2"}
    assert sorted(r["node"] for r in ranks) == multi_partition_nodes()  # one rank on each slurmd
    assert ranks[0]["weights"] == ranks[1]["weights"]  # different seeds per rank: DDP kept them in sync
    assert ranks[0]["final"]["val/acc1"] >= 0 and ranks[1]["final"] == {}  # only rank 0 reports
    (run,) = runs(tmp_path)
    assert run.info.status == "FINISHED" and run.data.tags["queued_as"] == placeholder
    assert client.get_run(placeholder).info.lifecycle_stage == "deleted"
    steps = client.get_metric_history(run.info.run_id, "train/loss_step")
    assert sorted(m.step for m in steps) == list(range(256 // (2 * 32)))  # 2 ranks share the 256 images; one logger
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc1")] == [0]
    assert client.get_metric_history(run.info.run_id, "val/acc1")[0].value == ranks[0]["final"]["val/acc1"]


# ------------------------------------------------------------------------------------ basic auth
def _script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=250)


@pytest.mark.timeout(600)
@pytest.mark.skipif(os.geteuid() != 0, reason="scripts/tracking-server.sh runs as root")
def test_start_with_auth_puts_the_server_behind_basic_auth_and_start_switches_it_back(server: dict[str, str]) -> None:
    """`start --auth` restarts only mlflow (PostgreSQL and its data stay): anonymous requests get
    401, the credentials `status` prints work, the runs logged before are still there; `start`
    again is a no-op; `start` without --auth switches back. Runs last: the other tests need it open."""
    client = MlflowClient(server["MLFLOW_TRACKING_URI"])
    before = client.create_experiment(unique("cluster_auth"))
    pg_pid = Path(os.environ.get("TRACKING_DIR", "/tmp/tracking-server")) / "pgdata" / "postmaster.pid"
    postmaster = pg_pid.read_text().split()[0]
    try:
        started = _script("start", "--auth")
        assert started.returncode == 0, started.stderr[-3000:]
        code, exports = server_status()
        assert code == 0 and exports["MLFLOW_TRACKING_USERNAME"] == "admin" and exports["MLFLOW_TRACKING_PASSWORD"]
        uri = exports["MLFLOW_TRACKING_URI"]
        assert uri == server["MLFLOW_TRACKING_URI"] and exports["OPTUNA_STORAGE"] == server["OPTUNA_STORAGE"]
        with pytest.raises(urllib.error.HTTPError) as anonymous:
            urllib.request.urlopen(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
        assert anonymous.value.code == 401
        authed = subprocess.run(
            [sys.executable, "-c", f"import mlflow; print(mlflow.get_experiment({before!r}).name)"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, **exports},
        )
        assert authed.returncode == 0 and authed.stdout.startswith("cluster_auth_"), authed.stderr[-2000:]
        assert pg_pid.read_text().split()[0] == postmaster  # PostgreSQL was not restarted
        again = _script("start", "--auth")
        assert again.returncode == 0 and "starting" not in again.stderr, again.stderr  # idempotent
    finally:
        reopened = _script("start")
    assert reopened.returncode == 0 and "switching mlflow server to 'open'" in reopened.stderr, reopened.stderr
    code, exports = server_status()
    assert code == 0 and "MLFLOW_TRACKING_PASSWORD" not in exports
    assert client.get_experiment(before).name.startswith("cluster_auth_")  # open again, the same store


@pytest.mark.timeout(120)
def test_runs_of_one_experiment_starting_together_all_link_their_datasets(server: dict[str, str]) -> None:
    """The jobs of an array start at once and each links the same datasets: MLflow's server inserts an
    experiment's dataset row by look-up-then-insert, so one of two simultaneous requests met a unique-key
    violation on PostgreSQL and its job failed (seen in CI); the tracker retries, and every run links both."""
    import threading

    from harness.config import DataConfig
    from harness.tracking import RunTracker, dataset_inputs

    client = MlflowClient(server["MLFLOW_TRACKING_URI"])
    datasets = dataset_inputs(DataConfig())
    for _ in range(3):  # fresh experiments: the race is on the first insert of each dataset row
        experiment_id = client.create_experiment(unique("cluster_datasets"))
        run_ids = [client.create_run(experiment_id).info.run_id for _ in range(8)]
        barrier = threading.Barrier(len(run_ids))
        errors: list[BaseException] = []

        def link(run_id: str, barrier: threading.Barrier, errors: list[BaseException]) -> None:
            barrier.wait()
            try:
                RunTracker(client, run_id).log_inputs(datasets)
            except BaseException as error:  # collected: the assertion below names it
                errors.append(error)

        threads = [threading.Thread(target=link, args=(run_id, barrier, errors)) for run_id in run_ids]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors[0]
        for run_id in run_ids:
            names = sorted(d.dataset.name for d in client.get_run(run_id).inputs.dataset_inputs)
            assert names == ["cluttered_mnist-train", "cluttered_mnist-val"]
