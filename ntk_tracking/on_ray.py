"""Ray: the sweep's children and the analysis of many runs as Ray tasks on a cluster.

    ntk-tracking sweep --widths 16,64 --depths 1,2 --executor ray --ray-address auto --cpus-per-run 2
    ntk-tracking analyze RUN [RUN ...] --executor ray --ray-address auto --cpus-per-task 2

Shared: joining the cluster (`connect`), the tracking server every worker must reach
(`check_tracking_uri_for_ray`), the driver's tracking credentials handed to workers (`credentials`).

Training children (RayExecutor). A Ray task receives its child's task config (the object, sent by
Ray), writes it as config.json in a temporary folder on its worker and starts `python -m
ntk_tracking.run --config config.json` with MLFLOW_RUN_ID set to its child, exactly as the local
executor does, so the child logs its own metrics, checkpoints and (from the task) its log, and a
relaunched child resumes from its resume checkpoint. The training process dies with the Ray worker
that started it (PR_SET_DEATHSIG), so a worker lost mid-run leaves no orphan training the same run;
Ray then retries the task (`MAX_RETRIES`), and the retry resumes. A training process killed by a
signal (e.g. the OOM killer) is retried the same way; one that exits with an error is not (it would
fail again). With analysis settings, each finished child's analysis (`python -m ntk_tracking.run
--analyze RUN_ID --settings settings.json`, what `ntk-tracking analyze RUN_ID` does) runs as a
further Ray task with the same resources.

Analysis (analyze_on_ray). The driver checks every run here first (settings, data paths, the
tracking server), exactly as the local analyzer does, and then hands out (run, checkpoint) jobs to
a pool of Ray actors (AnalysisWorker), each asking for --cpus-per-task / --gpus-per-task. An actor
keeps one Analyzer per run, so a run's kernels compile once per actor; a free actor takes its next
job from the run it last measured. Every job goes through `Analyzer.analyze_epoch`
(`analyze_until_logged`, which a sweep's local analysis uses too): the checkpoint is claimed in the
tracking store, measured, and its metrics logged in one batch at step = epoch, so a rerun adds
nothing. An actor killed mid-checkpoint is restarted and its job retried (MAX_RETRIES): the dead
worker's claim is taken over (at once on the same machine, after the claim's expiry elsewhere) and
the checkpoint is logged once.

Every worker reaches the tracking server itself, so the tracking URI must be an http(s) server
(`mlflow server`), never a local sqlite or file store.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import mlflow
from tqdm.auto import tqdm

from ntk_tracking import tracking
from ntk_tracking.sweep.run import (LOG_TAIL_LINES, Runner, analysis_command, child_command, child_variables,
                                   log_tail, process_env)

MAX_RETRIES = 3  # Ray retries of a child whose worker or training process was killed; restarts of a
# killed analysis actor, and retries of the job it was running
MAX_IN_FLIGHT = 256  # children submitted at once (Ray queues them by resources)
CONNECT_TIMEOUT_SECONDS = 10.0
WAIT_SECONDS = 5.0  # a checkpoint claimed by another analyzer: look again this often until it is logged

_CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH")
_SERVER_HOWTO = (
    "start a tracking server that every Ray node can reach, e.g. `mlflow server --host 0.0.0.0 "
    "--port 5000 --backend-store-uri sqlite:///mlflow.db --artifacts-destination ./mlartifacts` "
    "(a database such as postgresql://… and an object store such as s3://… for a real cluster), "
    "then set MLFLOW_TRACKING_URI=http://<this host>:5000")


def credentials() -> dict[str, str]:
    """The driver's tracking credentials for workers that lack their own."""
    return {k: os.environ[k] for k in _CREDENTIALS if k in os.environ}


def check_tracking_uri_for_ray(uri: str | None = None) -> None:
    """ValueError unless the tracking URI is a server that workers on other machines can reach."""
    uri = uri or mlflow.get_tracking_uri()
    if not tracking.is_http_uri(uri):
        raise ValueError(f"--executor ray needs a tracking server that every worker can reach, but the "
                         f"tracking URI is {tracking.redact_uri(uri)!r} (a store on this machine); {_SERVER_HOWTO}")
    host = urlsplit(uri).hostname or ""
    if host in ("localhost", "127.0.0.1", "::1"):
        print(f"note: the tracking URI {tracking.redact_uri(uri)} names this machine: fine for a "
              "single-node Ray cluster, unreachable from other nodes", file=sys.stderr)


def _check_address(address: str) -> None:
    """ValueError within CONNECT_TIMEOUT_SECONDS if a HOST:PORT (or ray://HOST:PORT) does not accept."""
    if address == "auto":
        return
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"--ray-address {address!r}: expected auto, HOST:PORT or ray://HOST:PORT "
                         "(the head node's GCS port, 6379 by default)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_SECONDS):
            pass
    except OSError as err:
        raise ValueError(f"cannot reach a Ray cluster at {address} within {CONNECT_TIMEOUT_SECONDS:.0f} s "
                         f"({err}); start one with `ray start --head --port 6379` on the head node and "
                         "`ray start --address HEAD:6379` on the others, or leave --ray-address empty "
                         "to start Ray on this machine") from None


def connect(address: str | None) -> None:
    """Join the Ray cluster at `address` (auto, HOST:PORT, ray://…); empty: RAY_ADDRESS, else a
    Ray started on this machine; an initialized Ray is kept. ValueError if it cannot be reached."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        _check_address(address)
    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError) as err:
        raise ValueError(f"cannot connect to the Ray cluster at {address or 'auto'}: {err}; start it "
                         "with `ray start --head`, or leave --ray-address empty to start Ray here") from None


# -- training children ---------------------------------------------------------------------

class ChildProcessKilled(RuntimeError):
    """A child's training process was killed by a signal: Ray retries the task."""


def _die_with_parent() -> None:
    """In the child process: be killed when the Ray worker that started it dies (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_child_process(job: dict, variables: dict[str, str], run_id: str,
                      log_artifact: str | None) -> tuple[int, str]:
    """The body of a Ray task: a child's process with `variables`; returns (exit status, last log
    lines). `job`: {"config": a task config's dict} trains it; {"analyze": RUN_ID, "settings": an
    AnalysisSettings dict, "data_paths": [...]} analyzes that run. The document is written into a
    temporary folder here, where the process reads it. Uploads the log to `log_artifact` of
    `run_id`; raises ChildProcessKilled when a signal killed the process, so that Ray retries."""
    env = process_env(variables)
    with tempfile.TemporaryDirectory(prefix="ntk-ray-child-") as tmp:
        if "config" in job:
            log_path = Path(tmp) / "train.log"
            config_path = Path(tmp) / "config.json"
            config_path.write_text(json.dumps(job["config"], indent=2, sort_keys=True))
            command = child_command(str(config_path))
        else:
            log_path = Path(tmp) / "analyze.log"
            settings_path = Path(tmp) / "settings.json"
            settings_path.write_text(json.dumps(job["settings"], indent=2, sort_keys=True))
            command = analysis_command(job["analyze"], str(settings_path), job.get("data_paths", ()))
        with open(log_path, "w") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    preexec_fn=_die_with_parent)
            try:
                returncode = proc.wait()
            except KeyboardInterrupt:  # ray.cancel: let the child end its run and flush checkpoints
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                raise
        if log_artifact is not None:
            try:
                mlflow.MlflowClient(variables["MLFLOW_TRACKING_URI"]).log_artifact(run_id, str(log_path), log_artifact)
            except Exception as err:  # noqa: BLE001 - the outcome matters more than the log
                print(f"could not upload the log of run {run_id}: {tracking.redact(str(err))}", file=sys.stderr)
        tail = log_tail(log_path, LOG_TAIL_LINES)
    if returncode < 0 and -returncode in (signal.SIGKILL, signal.SIGTERM, signal.SIGBUS, signal.SIGSEGV):
        raise ChildProcessKilled(f"{returncode}\n{tail}")
    return returncode, tail


class RayExecutor:
    """Where and with what resources children run on Ray; `analysis`: analyze finished children with
    these AnalysisSettings, reading recorded datasets under `data_paths`."""

    analyzes: bool

    def __init__(self, address: str | None = None, cpus_per_run: float = 1.0, gpus_per_run: float = 0.0,
                 analysis=None, data_paths: tuple[str, ...] = ()):
        if not cpus_per_run > 0:
            raise ValueError(f"--cpus-per-run must be > 0, got {cpus_per_run}")
        if not gpus_per_run >= 0:
            raise ValueError(f"--gpus-per-run must be ≥ 0, got {gpus_per_run}")
        self.address, self.cpus, self.gpus = address or None, float(cpus_per_run), float(gpus_per_run)
        self.analysis, self.data_paths = analysis, tuple(data_paths)
        self.analyzes = analysis is not None
        self.analysis_errors: list[str] = []

    def prepare(self) -> None:
        """Every check before any run is created: the tracking URI, the cluster and its resources."""
        tracking.configure_http()
        check_tracking_uri_for_ray()
        tracking.check_reachable()
        connect(self.address)
        import ray

        total = ray.cluster_resources()
        for name, need in (("CPU", self.cpus), ("GPU", self.gpus)):
            if need > total.get(name, 0.0):
                raise ValueError(f"each child asks for {need:g} {name}(s) (--{name.lower()}s-per-run) but the "
                                 f"Ray cluster has {total.get(name, 0.0):g} in all; ask for fewer or add nodes")

    def describe(self) -> str:
        return f"{self.cpus:g} CPU, {self.gpus:g} GPU per child"

    def concurrency(self, jobs: int) -> int:
        return min(jobs, MAX_IN_FLIGHT)

    def runner(self, plan, log_root: Path, write) -> Runner:
        return _RayRunner(plan, log_root, write, self)


class _RayRunner(Runner):
    """Each child's training (and analysis) as Ray tasks; the driver records outcomes only."""

    uploads_logs = False

    def __init__(self, plan, log_root: Path, write, executor: RayExecutor):
        import ray

        super().__init__(plan, log_root, write)
        self.executor = executor
        self.refs: set = set()
        self.remote = ray.remote(run_child_process).options(
            num_cpus=executor.cpus, num_gpus=executor.gpus, max_retries=MAX_RETRIES,
            retry_exceptions=[ChildProcessKilled])
        self.analysis_errors = executor.analysis_errors

    def _call(self, job: dict, variables: dict, run_id: str, log_artifact: str) -> int | None:
        import ray

        ref = self.remote.remote(job, {**variables, **credentials()}, run_id, log_artifact)
        with self.lock:
            self.refs.add(ref)
        try:
            return ray.get(ref)[0]
        except ray.exceptions.RayTaskError as err:
            cause = err.cause if isinstance(err.cause, ChildProcessKilled) else None
            if cause is None:
                raise
            return int(str(cause).split("\n", 1)[0])
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.TaskCancelledError):
            return None
        finally:
            with self.lock:
                self.refs.discard(ref)

    def train(self, key: str, run_id: str, log_path: Path) -> int | None:
        plan = self.plan
        job = {"config": plan.configs[key].to_dict()}  # the child's config, written on its worker
        returncode = self._call(job, child_variables(run_id, plan.experiment_id), run_id, "logs")
        log_path.write_text("(the log is the run's artifact logs/train.log)\n")
        return returncode

    def run(self, key: str, run_id: str, train: bool = True):
        result = super().run(key, run_id, train)
        if self.executor.analyzes and result.status == "FINISHED" and not self.stopping.is_set():
            job = {"analyze": run_id, "settings": self.executor.analysis.to_dict(),
                   "data_paths": list(self.executor.data_paths)}
            code = self._call(job, child_variables(None, self.plan.experiment_id), run_id, "logs")
            if code != 0:
                message = (f"analysis of child {key} ({run_id}) failed ({code}); see its artifact "
                           "logs/analyze.log")
                self.analysis_errors.append(message)
                self.write(message)
        return result

    def stop(self, grace_seconds: float = 30.0) -> None:
        import ray

        self.stopping.set()
        with self.lock:
            refs = list(self.refs)
        for ref in refs:
            ray.cancel(ref)


# -- analysis --------------------------------------------------------------------------------

class AnalysisWorker:
    """A Ray actor: analyzes checkpoints of any run, keeping each run's Analyzer (data, compiled kernels)."""

    def __init__(self, variables: dict[str, str]):
        os.environ.update(variables)
        self.analyzers = {}

    def analyze(self, run_id: str, epoch: int, settings, data_paths: tuple[str, ...], data: str | None):
        """(outcome, message): analyzed, already (another analyzer logged it), damaged or nonfinite."""
        from ntk_tracking.analyze import Analyzer

        if run_id not in self.analyzers:
            self.analyzers[run_id] = Analyzer(run_id, settings, data_paths=data_paths, data=data)
        return analyze_until_logged(self.analyzers[run_id], epoch)


def analyze_until_logged(analyzer, epoch: int, wait_seconds: float = WAIT_SECONDS) -> tuple[str, str]:
    """Analyze `epoch`, or wait until whoever holds its claim has logged it (a dead holder's claim
    is taken over when it is seen dead, or once it expires)."""
    from ntk_tracking.checkpointing import CheckpointError
    from ntk_tracking.ntk.measure import NonFiniteKernel

    while True:
        try:
            if analyzer.analyze_epoch(epoch) is not None:
                return "analyzed", ""
        except CheckpointError as err:
            return "damaged", str(err)
        except NonFiniteKernel as err:
            return "nonfinite", f"epoch {epoch}: {err}; not logged (a rerun tries it again)"
        if epoch in tracking.logged_steps(analyzer.client, analyzer.run_id, analyzer.marker_key()):
            return "already", ""
        time.sleep(wait_seconds)


def expand_runs(client, run_ids) -> list[str]:
    """Training runs to analyze: each id as given, a sweep's parent as its FINISHED children."""
    from ntk_tracking.sweep.plan import find_children, is_sweep_run

    runs = []
    for run_id in run_ids:
        if is_sweep_run(run_id, client):
            children = find_children(client, run_id)
            unfinished = sorted(k for k, r in children.items() if r.info.status != "FINISHED")
            if unfinished:
                print(f"sweep {run_id}: not analyzing unfinished children {', '.join(unfinished)}")
            runs += [r.info.run_id for _, r in sorted(children.items()) if r.info.status == "FINISHED"]
        else:
            runs.append(run_id)
    return list(dict.fromkeys(runs))


def analyze_on_ray(run_ids, settings, address: str | None = None, cpus_per_task: float = 1.0,
                   gpus_per_task: float = 0.0, data_paths: tuple[str, ...] = (), data: str | None = None,
                   progress: bool = True) -> dict[str, dict[str, list]]:
    """Every pending checkpoint of `run_ids` (sweep parents: their finished children) as Ray jobs.

    Returns run id -> {"analyzed": epochs, "already": epochs, "damaged" / "nonfinite" / "failed": [messages]}.
    Every check (tracking server, cluster resources, each run's settings and data paths) comes
    before any job starts; ValueError names the problem."""
    from ntk_tracking.analyze import Analyzer
    from ntk_tracking.confine import path_fields

    if not cpus_per_task > 0:
        raise ValueError(f"--cpus-per-task must be > 0, got {cpus_per_task}")
    if not gpus_per_task >= 0:
        raise ValueError(f"--gpus-per-task must be ≥ 0, got {gpus_per_task}")
    tracking.configure_http()
    check_tracking_uri_for_ray()
    tracking.check_reachable()
    client = tracking.client()
    runs = expand_runs(client, run_ids)
    if data and len(runs) > 1:
        raise ValueError("--data names one run's dataset; analyze that run alone with it")
    analyzers = {r: Analyzer(r, settings, client, data_paths=data_paths, data=data) for r in runs}
    # The workers read the data paths the driver accepted (their working directory is not ours).
    approved = {r: tuple(data_paths) + tuple(os.path.abspath(os.path.expanduser(p))
                                              for p in path_fields(a.config).values()) for r, a in analyzers.items()}
    jobs = {r: collections.deque(a.pending_epochs()) for r, a in analyzers.items()}
    outcomes = {r: {"analyzed": [], "already": sorted(set(a.store.cv_epochs()) - set(jobs[r])), "damaged": [],
                    "nonfinite": [], "failed": []} for r, a in analyzers.items()}
    total = sum(map(len, jobs.values()))
    if total:
        connect(address)
        import ray

        cluster = ray.cluster_resources()
        for name, need in (("CPU", cpus_per_task), ("GPU", gpus_per_task)):
            if need > cluster.get(name, 0.0):
                raise ValueError(f"each analysis task asks for {need:g} {name}(s) (--{name.lower()}s-per-task) but "
                                 f"the Ray cluster has {cluster.get(name, 0.0):g} in all; ask for fewer or add nodes")
        n_workers = max(1, min(total, int(cluster.get("CPU", 1.0) // cpus_per_task)))
        variables = {"MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(), **credentials()}
        actor = ray.remote(AnalysisWorker).options(num_cpus=cpus_per_task, num_gpus=gpus_per_task,
                                                   max_restarts=MAX_RETRIES, max_task_retries=MAX_RETRIES)
        workers = [actor.remote(variables) for _ in range(n_workers)]
        _dispatch(workers, jobs, outcomes, settings, approved, data, progress)
    for run_id, outcome in outcomes.items():
        if outcome["analyzed"]:
            analyzers[run_id].log_figure()
    return outcomes


def _dispatch(workers, jobs, outcomes, settings, approved, data, progress) -> None:
    """Hand jobs to free workers (a worker's last run first), collect outcomes as they finish."""
    import ray

    last_run = {i: None for i in range(len(workers))}
    free, in_flight = list(range(len(workers))), {}
    bar = tqdm(total=sum(map(len, jobs.values())), desc="NTK on Ray", unit="ckpt", disable=not progress)
    try:
        while in_flight or any(jobs.values()):
            while free and any(jobs.values()):
                w = free.pop()
                run_id = last_run[w] if jobs.get(last_run[w]) else max(jobs, key=lambda r: len(jobs[r]))
                epoch = jobs[run_id].popleft()
                ref = workers[w].analyze.remote(run_id, epoch, settings, approved[run_id], data)
                in_flight[ref] = (w, run_id, epoch)
                last_run[w] = run_id
            done, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in done:
                w, run_id, epoch = in_flight.pop(ref)
                try:
                    outcome, message = ray.get(ref)
                except ray.exceptions.RayError as err:  # the actor died more often than it is restarted
                    outcome, message = "failed", f"epoch {epoch}: the Ray worker failed: {err}"
                if outcome in ("analyzed", "already"):
                    outcomes[run_id][outcome].append(epoch)
                else:
                    outcomes[run_id][outcome].append(message)
                    tqdm.write(f"{run_id}: {outcome}: {message}", file=sys.stderr)
                free.append(w)
                bar.set_postfix_str(f"run {run_id[:8]} epoch {epoch}: {outcome}")
                bar.update(1)
    finally:
        bar.close()
        for ref in in_flight:
            ray.cancel(ref)
    for outcome in outcomes.values():
        outcome["analyzed"].sort()
        outcome["already"].sort()
