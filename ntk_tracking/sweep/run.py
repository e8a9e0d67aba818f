"""Running a sweep: the parent run, its children created up front, each trained by an executor."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import mlflow
from mlflow.entities import Param
from tqdm.auto import tqdm

from ntk_tracking import tracking, ui_links
from ntk_tracking.run import write_config
from ntk_tracking.sweep.plan import SweepPlan, find_children, plan_sweep
from ntk_tracking.keys import (FAILED_TAG, KEY_TAG, KIND_TAG, PARENT_TAG, TASK_TAG, TEST_ACCURACY, TEST_LOSS,
                               TRAIN_LOSS)
from ntk_tracking.sweep.spec import GRID, SPEC_ARTIFACT, SweepSpec

LOG_TAIL_LINES = 15  # a failed child's log lines shown


@dataclasses.dataclass
class ChildResult:
    key: str
    run_id: str
    status: str
    error: str | None = None
    skipped: bool = False  # FINISHED before this launch


@dataclasses.dataclass
class SweepResult:
    parent_run_id: str
    children: list[ChildResult]

    @property
    def failed(self) -> list[ChildResult]:
        return [c for c in self.children if c.status != "FINISHED"]


def child_command(config_path: str) -> list[str]:
    """The training process of one child: the library entry that trains the task config in
    `config_path` (a config.json document) as `ntk-tracking train` would, in the run MLFLOW_RUN_ID names."""
    return [sys.executable, "-m", "ntk_tracking.run", "--config", str(config_path), "--no-progress"]


def analysis_command(run_id: str, settings_path: str, data_paths=()) -> list[str]:
    """The analysis process of one finished child: the AnalysisSettings in `settings_path`."""
    allowed = [a for path in data_paths for a in ("--allow-data-path", str(path))]
    return [sys.executable, "-m", "ntk_tracking.run", "--analyze", run_id, "--settings", str(settings_path),
            *allowed, "--no-progress"]


def _child_command(config_path: str) -> list[str]:
    """The local executor's training process of one child (tests replace it to simulate a killed process)."""
    return child_command(config_path)


def child_variables(run_id: str | None, experiment_id: str) -> dict[str, str]:
    """What a child's process needs in its environment besides the machine's own."""
    variables = {"MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(), "MLFLOW_EXPERIMENT_ID": experiment_id,
                 "PYTHONUNBUFFERED": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    if run_id is not None:
        variables["MLFLOW_RUN_ID"] = run_id
    return variables


def process_env(variables: dict[str, str]) -> dict[str, str]:
    """This machine's environment plus `variables`, with a source checkout's root importable."""
    env = dict(os.environ, **variables)
    env.pop("MLFLOW_EXPERIMENT_NAME", None)
    if "MLFLOW_RUN_ID" not in variables:
        env.pop("MLFLOW_RUN_ID", None)
    root = Path(__file__).resolve().parents[2]
    if (root / "ntk_tracking").is_dir() and (root / "pyproject.toml").is_file():  # a source checkout
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    return env


def _child_env(run_id: str, experiment_id: str) -> dict[str, str]:
    return process_env(child_variables(run_id, experiment_id))


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Runner:
    """Runs children as subprocesses on this machine, records their outcome, stops them on interrupt.

    Executors subclass it: `train` runs one child's training process and returns its exit
    status (negative: killed by that signal; None: it could not be told)."""

    uploads_logs = True  # the driver uploads each child's log (a Ray task uploads its own)

    def __init__(self, plan: SweepPlan, log_root: Path, progress_write):
        self.plan, self.log_root, self.write = plan, log_root, progress_write
        self.client = plan.client
        self.stopping = threading.Event()
        self.live: set[subprocess.Popen] = set()
        self.lock = threading.Lock()

    def run(self, key: str, run_id: str, train: bool = True) -> ChildResult:
        """Train child `key` (unless `train` is False: it finished earlier) and record the outcome."""
        if not train:
            return ChildResult(key, run_id, "FINISHED", skipped=True)
        if self.stopping.is_set():
            return ChildResult(key, run_id, self.client.get_run(run_id).info.status, "not started: sweep stopped")
        if "error" in self.client.get_run(run_id).data.tags:  # from an earlier attempt
            self.client.delete_tag(run_id, "error")
        log_dir = self.log_root / key
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / "train.log"
        returncode = self.train(key, run_id, log_path)
        return self._record(key, run_id, returncode, log_path)

    def train(self, key: str, run_id: str, log_path: Path) -> int | None:
        config_path = write_config(self.plan.configs[key], log_path.parent / "config.json")
        command = _child_command(str(config_path))
        with open(log_path, "w") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                    env=_child_env(run_id, self.plan.experiment_id))
            with self.lock:
                self.live.add(proc)
            try:
                return proc.wait()
            finally:
                with self.lock:
                    self.live.discard(proc)

    def _record(self, key: str, run_id: str, returncode: int | None, log_path: Path) -> ChildResult:
        if self.uploads_logs:
            try:
                self.client.log_artifact(run_id, str(log_path), "logs")
            except Exception as err:  # noqa: BLE001 - a missing log must not hide the outcome
                warnings.warn(f"could not upload the log of {key}: {err}", RuntimeWarning, stacklevel=2)
        self.client.update_run(run_id, name=key)  # run_training renames the run it resumes
        run = self.client.get_run(run_id)
        status, error = run.info.status, run.data.tags.get("error")
        how = ("was lost with its worker" if returncode is None else f"killed by {signal.Signals(-returncode).name}"
               if returncode < 0 else f"exited with code {returncode}")
        if status == "FINISHED":  # the run is complete even if the process then died in teardown
            if returncode != 0:
                self.write(f"child {key} ({run_id}) FINISHED, then its process {how}")
            return ChildResult(key, run_id, status)
        if error is None or status not in ("FAILED", "KILLED"):
            last = log_tail(log_path, 1)
            error = f"training process {how} before ending its run" + (f": {last}" if last else "")
            self.client.set_tag(run_id, "error", error[:5000])
            self.client.set_terminated(run_id, "KILLED" if self.stopping.is_set() else "FAILED")
            status = self.client.get_run(run_id).info.status
        if not self.stopping.is_set():  # stopped by Ctrl-C: the sweep says so in one line
            self.write(f"child {key} ({run_id}) {status}: {error}\n--- last lines of its log ---\n"
                       f"{log_tail(log_path)}\n---")
        return ChildResult(key, run_id, status, error)

    def stop(self, grace_seconds: float = 30.0) -> None:
        """Interrupt the running children (they end their runs and flush checkpoints), then kill."""
        self.stopping.set()
        with self.lock:
            procs = list(self.live)
        for proc in procs:
            proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(grace_seconds)
            except subprocess.TimeoutExpired:
                proc.kill()


def _open_parent(plan: SweepPlan) -> str:
    """Create the parent run, or mark the relaunched one RUNNING again."""
    client = plan.client
    if plan.parent_run_id is None:
        if plan.experiment_id is None:
            plan.experiment_id = client.create_experiment(plan.experiment)
        return client.create_run(plan.experiment_id, run_name=f"sweep-{plan.spec.task}").info.run_id
    client.update_run(plan.parent_run_id, "RUNNING")
    tags = client.get_run(plan.parent_run_id).data.tags
    for stale in ("error", FAILED_TAG):
        if stale in tags:
            client.delete_tag(plan.parent_run_id, stale)
    return plan.parent_run_id


def _record_spec(plan: SweepPlan, parent_run_id: str) -> None:
    """Params, tags and sweep.json on a parent that does not have them yet."""
    client, spec = plan.client, plan.spec
    if tracking.load_json_artifact(parent_run_id, SPEC_ARTIFACT) is not None:
        return
    params = client.get_run(parent_run_id).data.params  # `mlflow run` logs its own first
    if set(spec.grid) == {f for f, _, _ in GRID}:  # the architecture scan: its shorthand options
        grid = {o: ",".join(map(repr if c is float else str, spec.grid[f])) for f, o, c in GRID}
    else:
        grid = {"grid": spec.grid_text()}
    values = {"task": spec.task, **grid, **spec.fixed}
    client.log_batch(parent_run_id, params=[Param(k, str(v)) for k, v in values.items() if k not in params])
    client.set_tag(parent_run_id, KIND_TAG, "sweep")
    client.set_tag(parent_run_id, TASK_TAG, spec.task)
    tracking.log_json_artifact(client, parent_run_id, spec.to_dict(), SPEC_ARTIFACT)


def _children(plan: SweepPlan, parent_run_id: str) -> dict[str, object]:
    """Every grid point's child run: found by key, or created (SCHEDULED until it trains)."""
    client = plan.client
    found = find_children(client, parent_run_id, plan.experiment_id)
    for key in plan.points:
        if key not in found:
            tags = {PARENT_TAG: parent_run_id, KIND_TAG: "training", TASK_TAG: plan.spec.task, KEY_TAG: key}
            run_id = client.create_run(plan.experiment_id, tags=tags, run_name=key).info.run_id
            client.update_run(run_id, "SCHEDULED")
            found[key] = client.get_run(run_id)
    return {key: found[key] for key in plan.points}


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep: its children were stopped and the parent run marked KILLED."""

    def __init__(self, parent_run_id: str):
        super().__init__(parent_run_id)
        self.parent_run_id = parent_run_id


def execute_sweep(plan: SweepPlan, workers: int = 1, progress: bool = True, executor=None) -> SweepResult:
    """Train every unfinished child (in `workers` processes at once) and end the parent run.

    `executor`: None trains on this machine; a RayExecutor (ntk_tracking.on_ray)
    runs each child (and, if it was given analysis settings, every finished child's analysis)
    as a Ray task, as many at once as the cluster's resources allow."""
    client = plan.client
    parent_run_id = _open_parent(plan)
    try:
        _record_spec(plan, parent_run_id)
        children = _children(plan, parent_run_id)
        ui_links.prepare_sweep(client, parent_run_id)
        results = {k: ChildResult(k, r.info.run_id, "FINISHED", skipped=True)
                   for k, r in children.items() if r.info.status == "FINISHED"}
        todo = [k for k in children if k not in results]
        how = (f"with {min(workers, max(len(todo), 1))} worker(s)" if executor is None
               else f"on Ray ({executor.describe()})")
        print(f"sweep {parent_run_id}: {len(children)} children, {len(results)} finished already, "
              f"{len(todo)} to train {how}")
        jobs = {k: k in todo for k in children} if executor is not None and executor.analyzes else \
            {k: True for k in todo}  # child key -> whether it trains
        running = [k for k in todo if children[k].info.status == "RUNNING"]
        if running:
            print(f"  restarting children left RUNNING ({', '.join(running)}): stop any other process "
                  "still training them first")
        bar = tqdm(total=len(children), initial=len(children) - len(jobs), desc=f"sweep {parent_run_id[:8]}",
                   unit="run", disable=not progress)
        with tempfile.TemporaryDirectory(prefix="ntk-sweep-") as logs:
            write = lambda text: tqdm.write(text, file=sys.stderr)  # noqa: E731
            runner = Runner(plan, Path(logs), write) if executor is None else \
                executor.runner(plan, Path(logs), write)
            threads = workers if executor is None else executor.concurrency(len(jobs))
            pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(threads, 1), thread_name_prefix="sweep")
            try:
                futures = {pool.submit(runner.run, k, children[k].info.run_id, train): k
                           for k, train in jobs.items()}
                for future in concurrent.futures.as_completed(futures):
                    result = future.result()
                    results[result.key] = result
                    bar.update(1)
                    bar.set_postfix(failed=sum(r.status != "FINISHED" for r in results.values()))
            except BaseException:
                runner.stop()
                raise
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
                bar.close()
    except BaseException as err:
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        client.set_tag(parent_run_id, "error", f"sweep stopped: {type(err).__name__}: {err}"[:5000])
        client.set_terminated(parent_run_id, status)
        if isinstance(err, KeyboardInterrupt):
            raise SweepInterrupted(parent_run_id) from None
        raise
    result = SweepResult(parent_run_id, [results[k] for k in plan.points])
    if result.failed:
        names = ", ".join(f"{c.key} ({c.run_id})" for c in result.failed)
        details = "; ".join(f"{c.key}: {c.error}" for c in result.failed)
        client.set_tag(parent_run_id, FAILED_TAG, ",".join(c.key for c in result.failed)[:5000])
        client.set_tag(parent_run_id, "error", f"{len(result.failed)} of {len(result.children)} children did "
                       f"not finish: {names}. {details}"[:5000])
        client.set_terminated(parent_run_id, "FAILED")
    else:
        client.set_terminated(parent_run_id, "FINISHED")
    return result


def run_sweep(spec: SweepSpec, parent_run_id: str | None = None, workers: int = 1,
              experiment: str | None = None, progress: bool = True) -> SweepResult:
    """Validate, then train the sweep; returns every child's outcome (the parent says FAILED if any failed)."""
    return execute_sweep(plan_sweep(spec, parent_run_id, experiment), workers, progress)


def print_summary(result: SweepResult, mlflow_client=None) -> None:
    """One line per child: status, final losses, run id."""
    client = mlflow_client or tracking.client()
    width = max(len(c.key) for c in result.children)
    print(f"{'child':<{width}}  {'status':<8}  {TRAIN_LOSS:>10}  {TEST_LOSS:>10}  {'test/acc':>8}  run id")
    for c in result.children:
        metrics = client.get_run(c.run_id).data.metrics
        cells = [f"{metrics[k]:.4g}" if k in metrics else "-" for k in (TRAIN_LOSS, TEST_LOSS, TEST_ACCURACY)]
        note = "  (finished earlier)" if c.skipped else ""
        print(f"{c.key:<{width}}  {c.status:<8}  {cells[0]:>10}  {cells[1]:>10}  {cells[2]:>8}  {c.run_id}{note}")
    done = len(result.children) - len(result.failed)
    print(f"sweep {result.parent_run_id}: {done} of {len(result.children)} children FINISHED"
          + (f"; not finished: {', '.join(c.key for c in result.failed)}" if result.failed else ""))
