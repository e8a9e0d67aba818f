"""The analyzer says what an analysis will cost after its first checkpoint."""

from __future__ import annotations

import re

import pytest

from conftest import use_tracking_store
from ntk_tracking.cli.analyze import analyze_main
from ntk_tracking.cli.train import train_main
from ntk_tracking.costs import CostEstimate, duration

pytestmark = pytest.mark.usefixtures("fast_compile")

LINE = re.compile(r"^NTK [0-9a-f]{8}: about \d+(\.\d)? (s|min|h) for (\d+) checkpoints \(.+\)$", re.M)


@pytest.mark.parametrize("seconds, text", [(0.14, "0.1 s"), (40.4, "40 s"), (660, "11 min"), (9000, "2.5 h")])
def test_durations_read_naturally(seconds, text):
    assert duration(seconds) == text


def test_the_first_checkpoint_less_its_compilation_sets_the_estimate_and_the_second_corrects_it():
    estimate = CostEstimate(12)
    assert estimate.after(55.0, compiling=45.0) == (
        "about 3 min for 12 checkpoints (the first took 55 s, 45 s of it compiling)")  # 55 + 11 × 10
    assert estimate.after(20.0, compiling=0.0) == "about 5 min for 12 checkpoints (20 s each after the first)"  # 75 + 10 × 20
    assert estimate.after(5.0, compiling=0.0) is None  # said twice at most


def test_no_correction_when_the_first_estimate_holds_and_nothing_for_one_checkpoint():
    estimate = CostEstimate(12)
    assert estimate.after(10.0, compiling=0.0).startswith("about 2 min for 12 checkpoints")
    assert estimate.after(9.0, compiling=0.0) is None  # 10 + 9 + 10 × 9 = 109 s, within a quarter of 120 s
    assert CostEstimate(1).after(30.0) is None  # done: nothing left to estimate


def test_compilation_is_measured_from_jax_itself():
    import jax
    import jax.numpy as jnp

    from ntk_tracking.costs import compile_seconds

    estimate = CostEstimate(3)
    before = compile_seconds()
    jax.jit(lambda x: jnp.sin(x) * 3.0 + x.sum())(jnp.ones(7)).block_until_ready()  # a new program
    compiled = compile_seconds() - before
    assert compiled > 0
    line = estimate.after(compiled + 1.0)  # the checkpoint: its compilation and 1 s of work
    assert line == (f"about {duration(compiled + 3.0)} for 3 checkpoints (the first took {duration(compiled + 1.0)}, "
                    f"{duration(compiled)} of it compiling)")  # the first, then 2 × 1 s


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
    assert "of it compiling" in out[first:].splitlines()[0]
    assert first < out.index(f"run {run_id}: epochs [0, 1, 2, 3]")
