"""Sweeps: a grid of training runs recorded as one MLflow parent run with a child run per point.

    ntk-tracking sweep --task mnist_dense --widths 16,64,256 --depths 1,2,4 --activations relu,tanh
    mlflow run . -e sweep --env-manager local -P widths=16,64 -P depths=1,2 -P epochs=5
    python -m pipelines.sweep --help

Each child is a normal tracked training run: `python -m pipelines.<task>` in a subprocess with
MLFLOW_RUN_ID set to the child, so it writes config.json, per-epoch metrics and CV checkpoints
exactly as a training entry point does, and resumes from its resume checkpoint when relaunched.
Children are created up front with a stable key tag; relaunching the sweep with the parent's id
skips FINISHED children and reruns (resumes) the others.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import mlflow
from mlflow.entities import Param, ViewType
from tqdm.auto import tqdm

from ntk_tracking import tracking
from ntk_tracking.cli import config_from_args, train_parser
from ntk_tracking.tasks import TASK_NAMES, get_task

KIND_TAG = "ntk_tracking.kind"
TASK_TAG = "ntk_tracking.task"
KEY_TAG = "ntk_tracking.sweep_key"
PARENT_TAG = "mlflow.parentRunId"
FAILED_TAG = "ntk_tracking.sweep_failed"
SPEC_ARTIFACT = "sweep.json"
# (config field, sweep option, value type): one child per combination, in this order.
GRID = (("width", "widths", int), ("depth", "depths", int), ("activation", "activations", str),
        ("init", "inits", str), ("learning_rate", "learning_rates", float), ("seed", "seeds", int))
_GRID_FIELDS = tuple(f for f, _, _ in GRID)
# A scan in the spirit of the paper's width × depth × activation figures; the other axes default
# to the task's single value.
GRID_DEFAULTS = {"widths": "16,64,256", "depths": "1,2,4", "activations": "relu,tanh"}
_NOT_PASSED = {"help", "experiment", "no_progress", "resume_interval_seconds"}  # sweep-level options, not training values
_LOG_TAIL_LINES = 15


def _scan_tasks() -> list[str]:
    """Tasks whose config has every grid field (the architecture scans)."""
    return [t for t in TASK_NAMES if all(hasattr(get_task(t).default_config(), f) for f in _GRID_FIELDS)]


def child_key(point: dict) -> str:
    """The stable name of a grid point, e.g. w64-d2-relu-lecun_normal-lr0.001-s0."""
    return (f"w{point['width']}-d{point['depth']}-{point['activation']}-{point['init']}"
            f"-lr{point['learning_rate']!r}-s{point['seed']}")


def _training_options(task: str) -> dict[str, argparse.Action]:
    """The training entry point's options by destination, as children receive them."""
    return {a.dest: a for a in train_parser(task)._actions if a.dest not in _NOT_PASSED}


@dataclasses.dataclass
class SweepSpec:
    """What a sweep trains: the task, the grid (field -> values) and the fixed training options."""

    task: str
    grid: dict[str, list]
    fixed: dict[str, object]

    def points(self) -> list[dict]:
        """Every grid point as {field: value}, in grid order."""
        values = itertools.product(*(self.grid[f] for f in _GRID_FIELDS))
        return [dict(zip(_GRID_FIELDS, v)) for v in values]

    def child_argv(self, point: dict) -> list[str]:
        """The training entry point's command line for one grid point (every value explicit)."""
        argv = []
        for dest, action in _training_options(self.task).items():
            value = point[dest] if dest in point else self.fixed[dest]
            if action.nargs == 0:  # a flag
                argv += [action.option_strings[0]] if value else []
            else:
                argv += [action.option_strings[0], repr(value) if isinstance(value, float) else str(value)]
        return argv + ["--no-progress"]

    def config(self, point: dict):
        """The validated task config of one grid point (ValueError naming the point)."""
        try:
            return config_from_args(self.task, argparse.Namespace(**self.fixed, **point))
        except ValueError as err:
            raise ValueError(f"grid point {child_key(point)}: {err}") from None

    def to_dict(self) -> dict:
        """The sweep.json document (JSON types only)."""
        return json.loads(json.dumps({"task": self.task, "grid": self.grid, "fixed": self.fixed}))


def _parse_list(text: str, convert, option: str, default) -> list:
    """A comma-separated option value; empty means the task's default."""
    items = [s.strip() for s in str(text).split(",")]
    if not any(items):
        return [default]
    if not all(items):
        raise ValueError(f"--{option}: empty item in {text!r}")
    try:
        values = [convert(s) for s in items]
    except ValueError:
        raise ValueError(f"--{option}: {text!r} is not a comma-separated list of {convert.__name__}") from None
    duplicates = sorted({str(v) for v in values if values.count(v) > 1})
    if duplicates:
        raise ValueError(f"--{option}: {', '.join(duplicates)} given more than once")
    return values


def _or_default(convert, default):
    """An argparse type where '' means the task's default (MLproject passes unset values as '')."""

    def parse(text):
        return default if text == "" else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def _yes_no(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if text.lower() in ("", "0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected yes or no, got {text!r}")


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors also end a run launched by `mlflow run` FAILED."""

    def error(self, message):
        tracking.fail_launched_run(f"{self.prog}: {message}")
        super().error(message)


def sweep_parser(task: str = "mnist_dense") -> argparse.ArgumentParser:
    """The sweep's options; training defaults come from `task`."""
    d = get_task(task).default_config()
    p = _Parser(
        prog="ntk-tracking sweep", allow_abbrev=False,
        description="Train every combination of the grid as a child run of one MLflow parent run "
        "(nested runs). Relaunch with --parent-run-id (or `mlflow run --run-id`) to skip finished "
        "children and resume the others. Grid lists are comma-separated; an empty value means the "
        "task's default.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--task", default=task, help=f"one of {list(TASK_NAMES)}")
    grid = p.add_argument_group("grid (one child run per combination)")
    for field, option, convert in GRID:
        names = [f"--{option.replace('_', '-')}", f"--{field.replace('_', '-')}", f"--{option}", f"--{field}"]
        grid.add_argument(*dict.fromkeys(names), dest=option, help=f"{field} values",
                          default=GRID_DEFAULTS.get(option, str(getattr(d, field))))
    fixed = p.add_argument_group("training options, the same for every child")
    for dest, action in _training_options(task).items():
        if dest in _GRID_FIELDS:
            continue
        if action.nargs == 0:
            fixed.add_argument(*action.option_strings, dest=dest, action="store_true", help=action.help)
        else:
            fixed.add_argument(*action.option_strings, dest=dest, default=action.default, help=action.help or dest,
                               type=_or_default(action.type or str, action.default))
    run = p.add_argument_group("the sweep")
    run.add_argument("--workers", type=int, default=1, help="children trained at once (one process each)")
    run.add_argument("--parent-run-id", "--parent_run_id", dest="parent_run_id", default="",
                     help="relaunch this sweep; empty: MLFLOW_RUN_ID under `mlflow run`, else a new parent run")
    run.add_argument("--experiment", default=None, help="MLflow experiment of a new sweep; unset: the active one")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    analysis = p.add_argument_group("analysis afterwards (ntk-tracking analyze on every finished child)")
    analysis.add_argument("--analyze", nargs="?", const=True, default=False, type=_yes_no,
                          help="measure the NTK of every finished child after training")
    analysis.add_argument("--subsets", type=int, default=20, help="K: measurement subsets per split")
    analysis.add_argument("--points", type=int, default=20, help="m: points per subset")
    analysis.add_argument("--splits", default="auto", help="comma-separated probe sets; auto = the task's own")
    analysis.add_argument("--analysis-seed", "--analysis_seed", dest="analysis_seed", type=int, default=0,
                          help="seed of the measurement subsets")
    analysis.add_argument("--implementation", default="auto", help="NTK implementation: structured, jacobian, ntvp or auto")
    return p


def parse_sweep(argv) -> tuple[SweepSpec, argparse.Namespace]:
    """The spec and the sweep-level options; ValueError for any bad value (argparse exits on syntax)."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--task", default="mnist_dense")
    task = pre.parse_known_args(argv)[0].task
    if task not in TASK_NAMES:
        raise ValueError(f"unknown task {task!r}; choose one of {list(TASK_NAMES)}")
    lacking = [f for f in _GRID_FIELDS if not hasattr(get_task(task).default_config(), f)]
    if lacking:
        raise ValueError(f"the sweep grid scans {list(_GRID_FIELDS)}, but task {task!r} has no "
                         f"{lacking}; sweep one of the tasks that have them: {', '.join(_scan_tasks())}")
    args = sweep_parser(task).parse_args(argv)
    d = get_task(task).default_config()
    grid = {field: _parse_list(getattr(args, option), convert, option.replace("_", "-"), getattr(d, field))
            for field, option, convert in GRID}
    fixed = {dest: getattr(args, dest) for dest in _training_options(task) if dest not in _GRID_FIELDS}
    if args.workers < 1:
        raise ValueError(f"--workers must be ≥ 1, got {args.workers}")
    return SweepSpec(task, grid, fixed), args


# -- planning: every check before any run is created --------------------------------------------


@dataclasses.dataclass
class SweepPlan:
    spec: SweepSpec
    points: dict[str, dict]  # key -> grid point, in grid order
    parent_run_id: str | None  # None: a new parent run is created
    experiment_id: str | None  # None: the experiment `experiment` is created with the parent
    experiment: str | None
    client: mlflow.MlflowClient


def plan_sweep(spec: SweepSpec, parent_run_id: str | None = None, experiment: str | None = None,
               mlflow_client=None) -> SweepPlan:
    """Validate every grid point, the data and the parent run; ValueError (RunError) if anything is off."""
    from ntk_tracking.data import load_dataset

    points = {child_key(p): p for p in spec.points()}
    configs = [spec.config(p) for p in points.values()]
    first = configs[0]
    try:  # the data does not depend on the grid: one load catches bad paths and sizes
        load_dataset(first.dataset, train_size=first.train_size, test_size=first.test_size, seed=first.seed)
    except ValueError as err:
        raise ValueError(f"dataset {first.dataset!r}: {err}") from None
    client = mlflow_client or tracking.client()
    launched = os.environ.get("MLFLOW_RUN_ID")
    if parent_run_id and launched and parent_run_id != launched:
        raise ValueError(f"--parent-run-id {parent_run_id} differs from MLFLOW_RUN_ID {launched}; give one")
    parent_run_id = parent_run_id or launched or None
    if parent_run_id is None:
        if not experiment:
            # What start_run would use: MLFLOW_EXPERIMENT_ID/NAME, set_experiment, else Default.
            experiment_id = mlflow.tracking.fluent._get_experiment_id()
        else:
            found = client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else None
        return SweepPlan(spec, points, None, experiment_id, experiment, client)
    parent = tracking.get_run(parent_run_id, client)
    kind = parent.data.tags.get(KIND_TAG)
    if kind not in (None, "sweep") or PARENT_TAG in parent.data.tags:
        raise tracking.RunError(f"run {parent_run_id} is a {kind or 'child'} run, not a sweep's parent run")
    saved = tracking.load_json_artifact(parent_run_id, SPEC_ARTIFACT)
    if saved is not None and saved != spec.to_dict():
        was, now = _flat(saved), _flat(spec.to_dict())
        changed = "; ".join(f"{k}: run has {was.get(k)!r}, now {now.get(k)!r}"
                            for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k))
        raise tracking.RunError(f"sweep {parent_run_id} was launched with other options ({changed}); "
                                "relaunch it with the original options, or start a new sweep")
    if experiment and client.get_experiment(parent.info.experiment_id).name != experiment:
        raise ValueError(f"sweep {parent_run_id} is not in experiment {experiment!r}")
    return SweepPlan(spec, points, parent_run_id, parent.info.experiment_id, experiment, client)


def _flat(spec: dict) -> dict:
    """sweep.json as {"task": …, "grid.width": […], "fixed.epochs": …} for naming differences."""
    flat = {"task": spec.get("task")}
    for part in ("grid", "fixed"):
        flat.update({f"{part}.{k}": v for k, v in spec.get(part, {}).items()})
    return flat


# -- running -------------------------------------------------------------------------------------


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


def find_children(client, parent_run_id: str, experiment_id: str | None = None) -> dict[str, object]:
    """The sweep's child runs by key (a FINISHED duplicate wins, then the newest)."""
    experiment_id = experiment_id or client.get_run(parent_run_id).info.experiment_id
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                                  ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            break
    runs.sort(key=lambda r: (r.info.status == "FINISHED", r.info.start_time or 0))
    return {r.data.tags[KEY_TAG]: r for r in runs if KEY_TAG in r.data.tags}


def is_sweep_run(run_id: str, mlflow_client=None) -> bool:
    """Whether `run_id` is a sweep's parent run (what `ntk-tracking analyze` routes on)."""
    run = tracking.get_run(run_id, mlflow_client)
    return run.data.tags.get(KIND_TAG) == "sweep"


def _child_command(task: str, argv: list[str]) -> list[str]:
    """The training process of one child (tests replace it to simulate a killed process)."""
    return [sys.executable, "-m", f"pipelines.{task}", *argv]


def _child_env(run_id: str, experiment_id: str) -> dict[str, str]:
    env = dict(os.environ, MLFLOW_RUN_ID=run_id, MLFLOW_TRACKING_URI=mlflow.get_tracking_uri(),
               MLFLOW_EXPERIMENT_ID=experiment_id, PYTHONUNBUFFERED="1",
               MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    env.pop("MLFLOW_EXPERIMENT_NAME", None)
    root = Path(__file__).resolve().parents[1]
    if (root / "pipelines").is_dir() and (root / "pyproject.toml").is_file():  # a source checkout
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    return env


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class _Runner:
    """Runs children as subprocesses, records their outcome, and stops them on interrupt."""

    def __init__(self, plan: SweepPlan, log_root: Path, progress_write):
        self.plan, self.log_root, self.write = plan, log_root, progress_write
        self.client = plan.client
        self.stopping = threading.Event()
        self.live: set[subprocess.Popen] = set()
        self.lock = threading.Lock()

    def run(self, key: str, run_id: str) -> ChildResult:
        if self.stopping.is_set():
            return ChildResult(key, run_id, self.client.get_run(run_id).info.status, "not started: sweep stopped")
        if "error" in self.client.get_run(run_id).data.tags:  # from an earlier attempt
            self.client.delete_tag(run_id, "error")
        log_dir = self.log_root / key
        log_dir.mkdir(parents=True)
        log_path = log_dir / "train.log"
        command = _child_command(self.plan.spec.task, self.plan.spec.child_argv(self.plan.points[key]))
        with open(log_path, "w") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                    env=_child_env(run_id, self.plan.experiment_id))
            with self.lock:
                self.live.add(proc)
            try:
                returncode = proc.wait()
            finally:
                with self.lock:
                    self.live.discard(proc)
        return self._record(key, run_id, returncode, log_path)

    def _record(self, key: str, run_id: str, returncode: int, log_path: Path) -> ChildResult:
        try:
            self.client.log_artifact(run_id, str(log_path), "logs")
        except Exception as err:  # noqa: BLE001 - a missing log must not hide the outcome
            warnings.warn(f"could not upload the log of {key}: {err}", RuntimeWarning, stacklevel=2)
        self.client.update_run(run_id, name=key)  # run_training renames the run it resumes
        run = self.client.get_run(run_id)
        status, error = run.info.status, run.data.tags.get("error")
        how = f"killed by {signal.Signals(-returncode).name}" if returncode < 0 else f"exited with code {returncode}"
        if status == "FINISHED":  # the run is complete even if the process then died in teardown
            if returncode != 0:
                self.write(f"child {key} ({run_id}) FINISHED, then its process {how}")
            return ChildResult(key, run_id, status)
        if error is None or status not in ("FAILED", "KILLED"):
            last = _tail(log_path, 1)
            error = f"training process {how} before ending its run" + (f": {last}" if last else "")
            self.client.set_tag(run_id, "error", error[:5000])
            self.client.set_terminated(run_id, "KILLED" if self.stopping.is_set() else "FAILED")
            status = self.client.get_run(run_id).info.status
        self.write(f"child {key} ({run_id}) {status}: {error}\n--- last lines of its log ---\n"
                   f"{_tail(log_path)}\n---")
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
    values = {"task": spec.task, **{o: ",".join(map(repr if c is float else str, spec.grid[f]))
                                    for f, o, c in GRID}, **spec.fixed}
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


def execute_sweep(plan: SweepPlan, workers: int = 1, progress: bool = True) -> SweepResult:
    """Train every unfinished child (in `workers` processes at once) and end the parent run."""
    client = plan.client
    parent_run_id = _open_parent(plan)
    try:
        _record_spec(plan, parent_run_id)
        children = _children(plan, parent_run_id)
        results = {k: ChildResult(k, r.info.run_id, "FINISHED", skipped=True)
                   for k, r in children.items() if r.info.status == "FINISHED"}
        todo = [k for k in children if k not in results]
        print(f"sweep {parent_run_id}: {len(children)} children, {len(results)} finished already, "
              f"{len(todo)} to train with {min(workers, max(len(todo), 1))} worker(s)")
        running = [k for k in todo if children[k].info.status == "RUNNING"]
        if running:
            print(f"  restarting children left RUNNING ({', '.join(running)}): stop any other process "
                  "still training them first")
        bar = tqdm(total=len(children), initial=len(results), desc=f"sweep {parent_run_id[:8]}",
                   unit="run", disable=not progress)
        with tempfile.TemporaryDirectory(prefix="ntk-sweep-") as logs:
            runner = _Runner(plan, Path(logs), lambda text: tqdm.write(text, file=sys.stderr))
            pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sweep")
            try:
                futures = {pool.submit(runner.run, k, children[k].info.run_id): k for k in todo}
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
    print(f"{'child':<{width}}  {'status':<8}  {'train/loss':>10}  {'test/loss':>10}  {'test/acc':>8}  run id")
    for c in result.children:
        metrics = client.get_run(c.run_id).data.metrics
        cells = [f"{metrics[k]:.4g}" if k in metrics else "-" for k in ("train/loss", "test/loss", "test/accuracy")]
        note = "  (finished earlier)" if c.skipped else ""
        print(f"{c.key:<{width}}  {c.status:<8}  {cells[0]:>10}  {cells[1]:>10}  {cells[2]:>8}  {c.run_id}{note}")
    done = len(result.children) - len(result.failed)
    print(f"sweep {result.parent_run_id}: {done} of {len(result.children)} children FINISHED"
          + (f"; not finished: {', '.join(c.key for c in result.failed)}" if result.failed else ""))


# -- analysis ------------------------------------------------------------------------------------


def analyze_sweep(parent_run_id: str, settings=None, progress: bool = True,
                  mlflow_client=None) -> dict[str, list[int]]:
    """Analyze every FINISHED child's pending checkpoints under one progress bar; child id -> epochs."""
    from ntk_tracking.analyze import AnalysisSettings, Analyzer

    client = mlflow_client or tracking.client()
    if not is_sweep_run(parent_run_id, client):
        raise tracking.RunError(f"run {parent_run_id} is not a sweep's parent run (no {KIND_TAG}=sweep tag)")
    children = find_children(client, parent_run_id)
    unfinished = sorted(k for k, r in children.items() if r.info.status != "FINISHED")
    if unfinished:
        print(f"sweep {parent_run_id}: not analyzing unfinished children {', '.join(unfinished)}")
    settings = settings or AnalysisSettings()
    # Every child is checked (settings, config) before any is measured.
    analyzers = {k: Analyzer(r.info.run_id, settings, client)
                 for k, r in sorted(children.items()) if r.info.status == "FINISHED"}
    pending = {k: a.pending_epochs() for k, a in analyzers.items()}
    for k, a in analyzers.items():
        if not pending[k] and not a.store.cv_epochs():
            warnings.warn(f"child {k} ({a.run_id}) has no CV checkpoints", RuntimeWarning, stacklevel=2)
    bar = tqdm(total=sum(map(len, pending.values())), desc=f"NTK sweep {parent_run_id[:8]}",
               unit="ckpt", disable=not progress)
    analyzed = {}
    try:
        for key in list(analyzers):
            analyzer = analyzers.pop(key)  # dropped after its child: measurements hold data
            done = []
            for epoch in pending[key]:
                bar.set_postfix(child=key, epoch=epoch)
                if analyzer.analyze_epoch(epoch) is not None:
                    done.append(epoch)
                bar.update(1)
            if done:
                analyzer.log_figure()
            analyzed[analyzer.run_id] = done
    finally:
        bar.close()
    return analyzed


# -- command line --------------------------------------------------------------------------------


def _fail(message: str):
    tracking.fail_launched_run(message)
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def sweep_main(argv=None) -> str:
    """`ntk-tracking sweep …`: returns the parent run id; exits 1 if a child did not finish."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        spec, args = parse_sweep(argv)
        settings = None
        if args.analyze:
            from ntk_tracking.analyze import AnalysisSettings

            settings = AnalysisSettings(
                num_subsets=args.subsets, subset_size=args.points, seed=args.analysis_seed,
                splits=tuple(s.strip() for s in args.splits.split(",") if s.strip()),
                implementation=args.implementation).validate()
        plan = plan_sweep(spec, args.parent_run_id or None, args.experiment)
    except ValueError as err:  # RunError included
        _fail(str(err))
    result = execute_sweep(plan, args.workers, progress=not args.no_progress)
    print_summary(result, plan.client)
    if settings is not None:
        try:
            analyzed = analyze_sweep(result.parent_run_id, settings, progress=not args.no_progress,
                                     mlflow_client=plan.client)
        except ValueError as err:  # e.g. children analyzed earlier with other settings; training stands
            print(f"error: analysis of sweep {result.parent_run_id}: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        print(f"analyzed {sum(map(len, analyzed.values()))} checkpoint(s) of {len(analyzed)} finished children")
    else:
        print(f"measure the NTK of every finished child with: ntk-tracking analyze {result.parent_run_id}")
    if result.failed:
        raise SystemExit(1)
    return result.parent_run_id


if __name__ == "__main__":
    sweep_main()
