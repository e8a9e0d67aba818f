"""A writer stalled past its claim (SIGSTOP at each stage), a claim held by a live analyzer, a writer
killed between recording and logging, claims a lost process left: real processes, on SQLite and on a
real `mlflow server`. The helpers here serve tests/test_midway_faults.py too."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import mlflow
import pytest

from ntk_tracking.cli.train import train_main

from test_one_writer import ANALYSIS, EPOCHS, TINY, cli, env_for, steps

# An analyzer that, when its progress shows STAGE at EPOCH, writes the stage to MARKER and then stops
# itself (SIGSTOP: heartbeat and all; SIGCONT lets it go on), or with NTK_TEST_WAIT_FOR=FILE waits
# until FILE exists (a SIGINT or a lost server meets it there).
STALLING_ANALYZER = """\
import os, signal, sys, time
from ntk_tracking import analyze
stage, epoch, marker = sys.argv[1:4]
real = analyze.Analyzer.analyze_epoch
def analyze_epoch(self, e):
    shown = self.on_stage
    def on_stage(text):
        shown(text)
        if text.startswith(f"epoch {epoch}: ") and stage in text and not os.path.exists(marker):
            open(marker, "w").write(text)
            go = os.environ.get("NTK_TEST_WAIT_FOR")
            if not go:
                os.kill(os.getpid(), signal.SIGSTOP)
            while go and not os.path.exists(go):
                time.sleep(0.05)
    self.on_stage = on_stage
    try:
        return real(self, e)
    finally:
        self.on_stage = shown
analyze.Analyzer.analyze_epoch = analyze_epoch
from ntk_tracking.cli import main
main(["analyze", *sys.argv[4:]])
"""


def stalled_analyzer(tmp_path, uri: str, run_id: str, stage: str, ttl: float, *extra,
                     wait_for=None) -> subprocess.Popen:
    """An analyzer of `run_id`, returned once it has stopped itself at `stage` of epoch 3 (with
    `wait_for`: once it waits there for that file)."""
    script, marker = tmp_path / "stalling.py", tmp_path / "stopped"
    script.write_text(STALLING_ANALYZER)
    env = env_for(uri, NTK_TRACKING_CLAIM_TTL_SECONDS=str(ttl), **({"NTK_TEST_WAIT_FOR": str(wait_for)}
                                                                   if wait_for else {}))
    proc = subprocess.Popen([sys.executable, str(script), stage, "3", str(marker), run_id, *ANALYSIS, *extra],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=as_in_a_terminal)
    deadline = time.monotonic() + 300
    while not (marker.exists() and (wait_for or process_state(proc.pid) == "T")):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the analyzer never reached {stage!r}: {proc.communicate()[1][-2000:]}")
        time.sleep(0.1)
    return proc


def as_in_a_terminal() -> None:
    """In a child before exec: SIGINT with its default action, as a terminal's foreground job has it
    (a test run started in the background inherits it ignored, and Python keeps it ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def process_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def analyzed_epochs(stdout: str) -> list[int]:
    found = re.search(r"analyzed \d+ checkpoint\(s\) of run \w+: epochs \[([\d, ]*)\]", stdout)
    assert found, stdout
    return [int(e) for e in found.group(1).split(",") if e.strip()]


def assert_every_point_once(run_id: str) -> None:
    """0 duplicate and 0 missing points: every NTK metric has exactly one point at each CV epoch."""
    client = mlflow.MlflowClient()
    keys = [k for k in client.get_run(run_id).data.metrics if k.startswith("ntk/")]
    assert len(keys) >= 14, keys
    for key in keys:
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == EPOCHS, key


@pytest.mark.parametrize("stage", ["measuring", "logging"])
def test_a_writer_stalled_past_its_claim_logs_nothing_twice(any_store, tmp_path, stage):
    run_id = train_main("mnist_dense", TINY)
    stalled = stalled_analyzer(tmp_path, any_store, run_id, stage, ttl=6)
    try:
        t0 = time.monotonic()
        other = subprocess.run(cli("analyze", run_id, *ANALYSIS), cwd=tmp_path, capture_output=True, text=True,
                               env=env_for(any_store, NTK_TRACKING_CLAIM_TTL_SECONDS="6"), timeout=300)
        assert other.returncode == 0, other.stderr[-2000:]
        assert time.monotonic() - t0 >= 3  # it waited for the stalled writer's claim to expire
    finally:
        os.kill(stalled.pid, signal.SIGCONT)
    stdout, stderr = stalled.communicate(timeout=300)
    assert stalled.returncode == 0, stderr[-2000:]
    assert "Traceback" not in stderr + other.stderr
    assert_every_point_once(run_id)
    # Each epoch counted once as analyzed between the two; the stalled writer lost epoch 3.
    mine, theirs = analyzed_epochs(stdout), analyzed_epochs(other.stdout)
    assert sorted(mine + theirs) == EPOCHS and 3 in theirs, (stdout, other.stdout)
    meanwhile = re.search(r"logged by another process meanwhile: epochs \[([\d, ]*)\]", stdout)
    assert meanwhile and [int(e) for e in meanwhile.group(1).split(",")] == theirs, stdout


def test_a_checkpoint_held_by_a_live_analyzer_is_named_and_not_counted(any_store, tmp_path):
    run_id = train_main("mnist_dense", TINY)
    stalled = stalled_analyzer(tmp_path, any_store, run_id, "measuring", ttl=120)
    try:
        other = subprocess.run(cli("analyze", run_id, *ANALYSIS, "--held-wait-seconds", "2"), cwd=tmp_path,
                               capture_output=True, text=True, env=env_for(any_store), timeout=300)
    finally:
        os.kill(stalled.pid, signal.SIGCONT)
    assert other.returncode == 5, other.stderr[-2000:]
    held = [line for line in other.stderr.splitlines() if line.startswith("held:")]
    assert len(held) == 1, other.stderr
    assert re.match(r"held: epoch 3: held by [^:]+:\d+ until \d{4}-\d\d-\d\d ", held[0]), held
    assert f":{stalled.pid} until" in held[0]
    assert 3 not in analyzed_epochs(other.stdout) and "meanwhile" not in other.stdout
    _, stderr = stalled.communicate(timeout=300)
    assert stalled.returncode == 0, stderr[-2000:]
    assert_every_point_once(run_id)


# A writer killed after it recorded epoch 2's points and before it logged them.
KILLED_AFTER_RECORDING = """\
import os, signal, sys
from ntk_tracking import claims
real = claims.record_once
def record_once(client, run_id, name, value):
    kept = real(client, run_id, name, value)
    if name == "points/2":
        os.kill(os.getpid(), signal.SIGKILL)
    return kept
claims.record_once = record_once
from ntk_tracking.cli import main
main(["analyze", *sys.argv[1:]])
"""


def test_points_recorded_by_a_killed_writer_are_logged_by_the_next(any_store, tmp_path):
    import json

    from ntk_tracking import claims

    run_id = train_main("mnist_dense", TINY)
    script = tmp_path / "killed.py"
    script.write_text(KILLED_AFTER_RECORDING)
    killed = subprocess.run([sys.executable, str(script), run_id, *ANALYSIS], cwd=tmp_path, env=env_for(any_store),
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert steps(run_id) == [0, 1]
    recorded = json.loads(claims.recorded(mlflow.MlflowClient(), run_id, "points/2"))
    done = subprocess.run(cli("analyze", run_id, *ANALYSIS), cwd=tmp_path, env=env_for(any_store),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_every_point_once(run_id)
    client = mlflow.MlflowClient()
    for key, value in recorded["metrics"].items():  # the killed writer's own values, not a second measurement
        (point,) = [m for m in client.get_metric_history(run_id, key) if m.step == 2]
        assert point.value == value and point.timestamp == recorded["timestamp"], key


def test_the_next_start_removes_claims_a_lost_process_left(any_store, tmp_path):
    from ntk_tracking import claims

    client = mlflow.MlflowClient()
    run = f"run-{tmp_path.name}"
    tombstone = client.create_experiment(f"{claims.PREFIX}/released/{tmp_path.name}")  # renamed, not deleted
    expired = claims.Claim.acquire(client, run, "analysis/1", ttl=0.2)  # its holder lost the store
    live = claims.Claim.acquire(client, run, "analysis/2", ttl=60)
    time.sleep(0.4)
    assert claims.clean_up(client, run) == 2
    names = [e.name for e in client.search_experiments() if tmp_path.name in e.name]  # the server is shared
    assert names == [claims.claim_name(run, "analysis/2")], names
    assert client.get_experiment(tombstone).lifecycle_stage == "deleted" and not expired.holds() and live.holds()
    live.release()
