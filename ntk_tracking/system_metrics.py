"""MLflow's system metrics (system/cpu_utilization_percentage, system/system_memory_usage_megabytes, disk,
network; system/gpu_* where nvidia-ml-py finds an NVIDIA GPU) sampled into a run while training or
analysis works on it. On by default; MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false turns them off."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import threading

SWITCH = "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"  # MLflow's own variable; unset means on here


def enabled() -> bool:
    return os.environ.get(SWITCH, "true").strip().lower() not in ("false", "0", "no", "off")


@contextlib.contextmanager
def sampled(run_id: str, node: str | None = None, busy: bool = True):
    """Sample system metrics into `run_id` while the block runs (keys system/<node>/… if `node`);
    nothing when not `busy` (an analysis with nothing to do adds nothing to its run).

    MLflow's own monitor (start_run(log_system_metrics=True)) stops as soon as its run is not RUNNING
    and logs nothing for a run shorter than its interval; this sampler reuses its probes but logs into a
    run of any status (the analyzer writes into finished runs) and always logs the last, partial interval."""
    if not (busy and enabled()):
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    _note_missing_gpu_probe()
    # resume_logging: steps continue after the run's earlier system metrics (a resumed or analyzed run).
    # Quiet: without a GPU MLflow logs "Skip logging GPU metrics" at INFO in every run.
    logger = logging.getLogger("mlflow.system_metrics.system_metrics_monitor")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        monitor = SystemMetricsMonitor(run_id, node_id=node, resume_logging=True)
    finally:
        logger.setLevel(level)
    stop = threading.Event()
    thread = threading.Thread(target=_sample, args=(monitor, stop), name="system-metrics", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _sample(monitor, stop: threading.Event) -> None:
    import psutil

    psutil.cpu_percent()  # its next call (the monitor's) gives the CPU use since now, not 0
    try:
        while True:
            stopping = stop.wait(monitor.sampling_interval)  # MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL, 10 s
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()
            if stopping:
                return
    except Exception as err:  # noqa: BLE001 - the run goes on without them; say why once
        from ntk_tracking import tracking

        if tracking.server_lost():  # the command itself says so, in its one line
            return
        print(tracking.redact(f"warning: system metrics stopped: {type(err).__name__}: {err}"), file=sys.stderr)


def _note_missing_gpu_probe() -> None:
    import jax

    if jax.default_backend() == "gpu" and importlib.util.find_spec("pynvml") is None:
        print("note: no GPU system metrics: MLflow reads them with nvidia-ml-py, not installed here: "
              "pip install 'ntk_tracking[gpu-metrics]'", file=sys.stderr)
