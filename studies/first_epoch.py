"""The paper's open question at step resolution: is the early fall of the NTK entropy an artifact
of the initialization? (issue: inside the first epoch)

    python studies/first_epoch.py run [--models mnist_vae] [--subsets 20]   # sweeps, resumable
    python studies/first_epoch.py report                                     # verdict table + figure

`run` trains the first epoch of each model under four settings, the default, a smaller initial
weight scale, a smaller learning rate and both (`ntk-tracking sweep --grid "init_scale=1,S
learning_rate=LR,LR/10" --seeds 0,1`), with CV checkpoints at log-spaced optimizer steps
(`--cv-log-steps`), analyzed by the sweep (`--analyze --subsets K --points m`). It runs in a
tracking store outside the project (`--store`, default `./first_epoch_store`); a sweep that was
stopped is resumed with `--parent-run-id`, and a finished one is only read back. Each child's
series is written to `studies/results/first_epoch/<model>.json`.

`report` reads only those files: per setting, the entropy at step 0, its minimum over the first
epoch (step, mean ± std over seeds) and at the end of the epoch, and whether the fall survives
(the minimum lies below step 0 by more than twice the seeds' combined standard deviation). It
writes `verdicts.md` beside the results and the figure `docs/first_epoch.png`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results" / "first_epoch"
FIGURE = HERE.parent / "docs" / "first_epoch.png"
TREEBANK = HERE.parent.parent / "shared" / "data" / "ud_grc_perseus"  # as in novelty.py

# Per model: its training options for the first epoch and the settings' values.
MODELS = {
    "mnist_vae": {"train": ["--epochs", "1"], "learning_rate": 1e-3},
    "cifar_resnet": {"train": ["--epochs", "1", "--dataset", "mnist5k", "--width", "0.25", "--train-size", "1000",
                               "--test-size", "500", "--augment", "no"], "learning_rate": 0.1},
    "greek_pos": {"train": ["--epochs", "1", "--dataset", "{treebank}", "--model-dim", "64", "--mlp-dim", "128",
                            "--probe-max-tokens", "8"], "learning_rate": 1e-3},  # novelty.py's quarter-size tagger
    "molpcba_gnn": {"train": ["--epochs", "1", "--dataset", "molecules-offline", "--batch-size", "32"],
                    "learning_rate": 1e-3},
}
SMALL_INIT = 0.5


def _env(store: pathlib.Path) -> dict:
    env = dict(os.environ)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"
    return env


def _parent(client, experiment: str):
    """The sweep's parent run in `experiment` (the latest), or None."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id], filter_string="tags.mlflow.parentRunId IS NULL",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def sweep_command(model: str, args) -> list[str]:
    lr = MODELS[model]["learning_rate"]
    grid = f"init_scale=1,{SMALL_INIT} learning_rate={lr:g},{lr / 10:g}"
    train = [a.replace("{treebank}", str(args.treebank)) for a in MODELS[model]["train"]]
    return ["ntk-tracking", "sweep", "--task", model, *train, "--grid", grid,
            "--seeds", ",".join(map(str, args.seeds)), "--cv-log-steps", str(args.cv_log_steps),
            "--analyze", "--subsets", str(args.subsets), "--points", str(args.points), "--splits", args.splits,
            "--experiment", f"first-epoch-{model}", "--no-progress"]


def run_model(model: str, args) -> None:
    import mlflow

    out = pathlib.Path(args.results) / f"{model}.json"
    store = pathlib.Path(args.store).resolve()
    store.mkdir(parents=True, exist_ok=True)
    env = _env(store)
    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    client = mlflow.MlflowClient()
    command = sweep_command(model, args)
    parent = _parent(client, f"first-epoch-{model}")
    if parent is None or parent.info.status != "FINISHED":
        argv = command + (["--parent-run-id", parent.info.run_id] if parent is not None else [])
        print("$", " ".join(argv), flush=True)
        subprocess.run(argv, env=env, cwd=store, check=True)
        parent = _parent(client, f"first-epoch-{model}")
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    runs = []
    for child in children:
        series = {}
        for key in child.data.metrics:
            if key.startswith("ntk/") or key in ("epoch", "train/loss"):
                series[key] = sorted([m.step, m.value] for m in client.get_metric_history(child.info.run_id, key))
        runs.append({"run_id": child.info.run_id, "status": child.info.status,
                     "init_scale": float(child.data.params["init_scale"]),
                     "learning_rate": float(child.data.params["learning_rate"]),
                     "seed": int(child.data.params["seed"]),
                     "step_unit": child.data.tags.get("ntk_tracking.step_unit"), "series": series})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    shown = " ".join(command).replace(str(args.treebank), "<treebank>")
    tmp.write_text(json.dumps({"model": model, "sweep_command": shown, "parent_run_id": parent.info.run_id,
                               "runs": runs}, indent=1))
    tmp.replace(out)
    print(f"{model}: wrote {out}", flush=True)


def _setting(run: dict, default_lr: float) -> str:
    init = "default init" if run["init_scale"] == 1 else f"init × {run['init_scale']:g}"
    lr = "default lr" if math.isclose(run["learning_rate"], default_lr) else f"lr {run['learning_rate']:g}"
    return f"{init}, {lr}"


def summarize(result: dict, key: str) -> list[dict]:
    """Per setting: entropy by step as mean ± std over seeds, and the fall's verdict."""
    import numpy as np

    default_lr = MODELS[result["model"]]["learning_rate"]
    by_setting: dict = {}
    for run in result["runs"]:
        if key in run["series"]:
            by_setting.setdefault(_setting(run, default_lr), []).append(dict(run["series"][key]))
    rows = []
    for setting, series in sorted(by_setting.items()):
        steps = sorted(set.intersection(*(set(s) for s in series)))
        values = np.array([[s[t] for t in steps] for s in series])  # (seeds, steps)
        mean, std = values.mean(0), values.std(0)
        i = int(np.argmin(mean[1:])) + 1 if len(steps) > 1 else 0
        drop = mean[0] - mean[i]
        noise = 2 * math.hypot(std[0], std[i])
        j = int(np.argmax(mean[:i + 1]))  # the highest point up to the minimum
        rows.append({"peak_step": steps[j], "peak": (mean[j], std[j]),
                     "setting": setting, "seeds": len(series), "steps": steps, "mean": mean.tolist(),
                     "std": std.tolist(), "start": (mean[0], std[0]), "min_step": steps[i],
                     "min": (mean[i], std[i]), "end": (mean[-1], std[-1]),
                     "falls": bool(drop > noise), "drop": drop, "noise": noise})
    return rows


def report(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = sorted(pathlib.Path(args.results).glob("*.json"))
    if not results:
        sys.exit(f"no results in {args.results}: run `python studies/first_epoch.py run` first")
    lines = ["# Inside the first epoch: does the early entropy fall survive the initialization?", "",
             "Entropy of the NTK's normalized spectrum (`ntk/entropy/<split>`), mean ± std over seeds, at "
             "optimizer steps of the first epoch. *Falls*: the minimum lies below step 0 by more than twice "
             "the seeds' combined std. Made by `python studies/first_epoch.py report` from the files "
             "beside this one.", ""]
    data = [json.loads(p.read_text()) for p in results]
    fig, axes = plt.subplots(1, len(data), figsize=(5 * len(data), 3.6), squeeze=False)
    for result, ax in zip(data, axes[0]):
        split = "train"
        key = f"ntk/entropy/{split}"
        rows = summarize(result, key)
        lines += [f"## {result['model']}", "", f"`{result['sweep_command']}`", "",
                  "| setting | seeds | step 0 | highest before the minimum (step: entropy) | minimum (step: entropy) "
                  "| end of epoch 1 (step) | falls? |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            still = " and still falling at the epoch's end" if r["falls"] and r["min_step"] == r["steps"][-1] else ""
            lines.append(f"| {r['setting']} | {r['seeds']} | {r['start'][0]:.3f} ± {r['start'][1]:.3f} | "
                         f"{r['peak_step']}: {r['peak'][0]:.3f} ± {r['peak'][1]:.3f} | "
                         f"{r['min_step']}: {r['min'][0]:.3f} ± {r['min'][1]:.3f} | "
                         f"{r['end'][0]:.3f} ± {r['end'][1]:.3f} ({r['steps'][-1]}) | "
                         f"{'yes' if r['falls'] else 'no'}{still} (drop {r['drop']:.3f}, 2σ {r['noise']:.3f}) |")
            x = [max(s, 0.5) for s in r["steps"]]  # step 0 drawn at 0.5 on the log axis
            ax.errorbar(x, r["mean"], yerr=r["std"], marker="o", ms=3, capsize=2, label=r["setting"])
        ax.set_xscale("log")
        ax.set_xlabel("optimizer step (step 0 drawn at 0.5)")
        ax.set_ylabel(f"NTK entropy ({split})")
        ax.set_title(result["model"])
        ax.legend(fontsize=7)
        lines.append("")
    fig.tight_layout()
    fig.savefig(FIGURE, dpi=120)
    out = pathlib.Path(args.results) / "verdicts.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out} and {FIGURE}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="the sweeps (resumable)")
    r.add_argument("--models", nargs="+", default=["mnist_vae"], choices=list(MODELS))
    r.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    r.add_argument("--cv-log-steps", type=int, default=10, help="log-spaced step checkpoints in the first epoch")
    r.add_argument("--subsets", type=int, default=20, help="K subsets per probe set")
    r.add_argument("--points", type=int, default=20, help="m points per subset")
    r.add_argument("--splits", default="train", help="probe sets to analyze")
    r.add_argument("--store", default="first_epoch_store", help="folder of the study's tracking store")
    r.add_argument("--treebank", default=str(TREEBANK), help="UD Ancient Greek Perseus folder or .conllu file")
    r.add_argument("--results", default=str(RESULTS))
    s = sub.add_parser("report", help="verdict table and figure from the result files")
    s.add_argument("--results", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.command == "run":
        for model in args.models:
            run_model(model, args)
    else:
        report(args)


if __name__ == "__main__":
    main()
