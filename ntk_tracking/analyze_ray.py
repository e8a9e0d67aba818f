"""Analysis on a Ray cluster: the pending checkpoints of many runs fanned out as Ray tasks.

    ntk-tracking analyze RUN [RUN ...] --executor ray --ray-address auto --cpus-per-task 2

The driver checks every run here first (settings, data paths, the tracking server), exactly as the
local analyzer does, and then hands out (run, checkpoint) jobs to a pool of Ray actors, each
asking for --cpus-per-task / --gpus-per-task. An actor keeps one Analyzer per run, so a run's
kernels compile once per actor; a free actor takes its next job from the run it last measured.

Every job goes through `Analyzer.analyze_epoch`: the checkpoint is claimed in the tracking store,
measured, and its metrics logged in one batch at step = epoch, so a rerun adds nothing. An actor
killed mid-checkpoint is restarted and its job retried (MAX_RETRIES): the dead worker's claim is
taken over (at once on the same machine, after the claim's expiry elsewhere) and the checkpoint is
logged once. Workers log to the tracking server themselves, so it must be an http(s) server.
"""

from __future__ import annotations

import collections
import os
import sys
import time

import mlflow
from tqdm.auto import tqdm

from ntk_tracking import tracking

MAX_RETRIES = 3  # restarts of a killed actor, and retries of the job it was running
WAIT_SECONDS = 5.0  # a checkpoint claimed by another analyzer: look again this often until it is logged


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
    from ntk_tracking.sweep.ray_executor import _credentials, check_tracking_uri_for_ray, connect

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
        variables = {"MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(), **_credentials()}
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
