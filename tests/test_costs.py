"""The analyzer says what an analysis will cost after its first checkpoint."""

from __future__ import annotations

import re

import pytest

from conftest import use_tracking_store
from ntk_tracking.cli import analyze_main, train_main
from ntk_tracking.costs import CostEstimate, duration

pytestmark = pytest.mark.usefixtures("fast_compile")

LINE = re.compile(r"^NTK [0-9a-f]{8}: about \d+(\.\d)? (s|min|h) for (\d+) checkpoints \(.+\)$", re.M)


@pytest.mark.parametrize("seconds, text", [(0.14, "0.1 s"), (40.4, "40 s"), (660, "11 min"), (9000, "2.5 h")])
def test_durations_read_naturally(seconds, text):
    assert duration(seconds) == text


def test_the_first_checkpoint_gives_an_upper_bound_and_the_second_refines_it():
    estimate = CostEstimate(12)
    assert estimate.after(55.0) == "about 11 min for 12 checkpoints (the first took 55 s, compilation included)"
    assert estimate.after(5.0) == "about 2 min for 12 checkpoints (5 s each after compilation)"  # 55 + 5 + 10 × 5
    assert estimate.after(5.0) is None


def test_no_refinement_when_compilation_was_cheap_and_nothing_for_one_checkpoint():
    estimate = CostEstimate(12)
    assert estimate.after(10.0).startswith("about 2 min for 12 checkpoints")
    assert estimate.after(9.0) is None  # 10 + 9 + 10 × 9 = 109 s, within a quarter of 120 s
    assert CostEstimate(1).after(30.0) is None  # done: nothing left to estimate


def test_the_analyzer_prints_the_estimate_after_its_first_checkpoint(tmp_path, monkeypatch, capsys):
    use_tracking_store(monkeypatch, tmp_path)
    run_id = train_main("mnist_dense", ["--width", "8", "--depth", "1", "--epochs", "3", "--train-size", "64",
                                        "--test-size", "32", "--batch-size", "16", "--no-progress"])
    capsys.readouterr()
    analyze_main([run_id, "--subsets", "2", "--points", "4", "--no-progress"])
    out = capsys.readouterr().out
    lines = LINE.findall(out)
    assert lines and all(count == "4" for *_, count in lines), out
    first = out.index(f"NTK {run_id[:8]}: about")
    assert "the first took" in out[first:].splitlines()[0]
    assert first < out.index(f"run {run_id}: epochs [0, 1, 2, 3]")
