"""Analyzing a sweep: every finished child's pending checkpoints under one progress bar."""

from __future__ import annotations

import time
import warnings

from tqdm.auto import tqdm

from ntk_tracking import system_metrics, tracking
from ntk_tracking.costs import CostEstimate
from ntk_tracking.keys import KIND_TAG
from ntk_tracking.sweep.plan import find_children, is_sweep_run


def analyze_sweep(parent_run_id: str, settings=None, progress: bool = True, mlflow_client=None,
                  data_paths: tuple[str, ...] = (), problems: list[str] | None = None) -> dict[str, list[int]]:
    """Analyze every FINISHED child's pending checkpoints under one progress bar; child id -> epochs.
    A checkpoint left unlogged (damaged, non-finite) is warned about and added to `problems`."""
    from ntk_tracking.analyze import AnalysisSettings, Analyzer
    from ntk_tracking.on_ray import analyze_until_logged

    client = mlflow_client or tracking.client()
    if not is_sweep_run(parent_run_id, client):
        raise tracking.RunError(f"run {parent_run_id} is not a sweep's parent run (no {KIND_TAG}=sweep tag)")
    children = find_children(client, parent_run_id)
    unfinished = sorted(k for k, r in children.items() if r.info.status != "FINISHED")
    if unfinished:
        print(f"sweep {parent_run_id}: not analyzing unfinished children {', '.join(unfinished)}")
    settings = settings or AnalysisSettings()
    # Every child is checked (settings, config) before any is measured.
    analyzers = {k: Analyzer(r.info.run_id, settings, client, data_paths=data_paths)
                 for k, r in sorted(children.items()) if r.info.status == "FINISHED"}
    pending = {k: a.pending_epochs() for k, a in analyzers.items()}
    for k, a in analyzers.items():
        if not pending[k] and not a.store.cv_epochs():
            warnings.warn(f"child {k} ({a.run_id}) has no CV checkpoints", RuntimeWarning, stacklevel=2)
    bar = tqdm(total=sum(map(len, pending.values())), desc=f"NTK sweep {parent_run_id[:8]}",
               unit="ckpt", disable=not progress)
    analyzed = {}
    estimate = CostEstimate(sum(map(len, pending.values())))
    try:
        for key in list(analyzers):
            analyzer = analyzers.pop(key)  # dropped after its child: measurements hold data
            done = []
            analyzer.on_stage = lambda text, key=key: bar.set_postfix_str(f"{key}: {text}", refresh=True)
            with system_metrics.sampled(analyzer.run_id, node="analysis", busy=bool(pending[key])):
                for epoch in pending[key]:
                    t0 = time.perf_counter()
                    # A checkpoint another analyzer holds is waited for until it is logged (or taken over).
                    outcome, message = analyze_until_logged(analyzer, epoch)
                    if outcome == "analyzed":
                        done.append(epoch)
                        cost = estimate.after(time.perf_counter() - t0)
                        if cost:
                            tqdm.write(f"NTK sweep {parent_run_id[:8]}: {cost}")
                    elif outcome != "already":  # damaged or non-finite: reported; the others still count
                        warnings.warn(f"child {key}: checkpoint {epoch} not analyzed: {message}", RuntimeWarning,
                                      stacklevel=2)
                        if problems is not None:
                            problems.append(f"child {key}: checkpoint {epoch}: {message}")
                    bar.update(1)
            if done:
                analyzer.log_figure()
            analyzed[analyzer.run_id] = done
    finally:
        bar.close()
    return analyzed
