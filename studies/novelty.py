"""Paper Fig. 3 (section 4) with this tool: entropy and trace through training of the novelty models.

    python studies/novelty.py run [--models M ...] [--seeds 0 1]   # train + analyze, resumable
    python studies/novelty.py report                               # verdicts + figure from the results

`run` trains each model with the product's own command (`ntk-tracking train TASK ...`) into a
tracking store outside the project (`--store`, default `./novelty_store`), analyzes it with
`ntk-tracking analyze RUN --subsets K --points m`, and writes the run's series, read back from
MLflow, to `studies/results/novelty/<model>_seed<k>.json`. A (model, seed) whose JSON exists is
skipped; a finished but unanalyzed run is analyzed (the analyzer skips what is done), so a killed
study restarts where it stopped. `report` evaluates the paper's claims from those files only and
writes `studies/results/novelty/verdicts.md` (+ `.json`) and the five-panel figure.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results" / "novelty"
FIGURE = HERE.parent / "docs" / "novelty_fig3.png"
TREEBANK = HERE.parent.parent / "shared" / "data" / "ud_grc_perseus"  # a dev file, split 80/20 by the loader

# Training options per model (the product's CLI flags), with the analysis's K subsets of m points.
MODELS = {
    "cifar_resnet": {
        "task": "cifar_resnet",
        "train": ["--dataset", "mnist5k", "--width", "0.25", "--train-size", "1000", "--test-size", "500",
                  "--epochs", "12", "--cv-every", "4", "--cv-log-points", "8", "--augment", "no"],
        "analyze": ["--subsets", "20", "--points", "20"],
    },
    "greek_pos": {  # a quarter-size tagger and 8 probe tokens: the default's kernel takes 57 s here
        "task": "greek_pos",
        "train": ["--dataset", "{treebank}", "--model-dim", "64", "--mlp-dim", "128", "--probe-max-tokens", "8",
                  "--epochs", "20", "--cv-every", "5", "--cv-log-points", "10"],
        "analyze": ["--subsets", "10", "--points", "20", "--splits", "train"],
    },
    "molpcba_gnn": {
        "task": "molpcba_gnn",
        "train": ["--dataset", "molecules-offline", "--epochs", "30", "--batch-size", "32", "--cv-every", "10",
                  "--cv-log-points", "10"],
        "analyze": ["--subsets", "20", "--points", "20"],
    },
    "mnist_vae": {
        "task": "mnist_vae",
        "train": ["--epochs", "30", "--cv-every", "10", "--cv-log-points", "10"],
        "analyze": ["--subsets", "20", "--points", "20"],
    },
    "pong_actor_critic": {  # the default configuration of studies/pong_rl.md
        "task": "pong_actor_critic",
        "train": [],
        "analyze": ["--subsets", "20", "--points", "20"],
    },
}


def _argv(model: str, part: str, treebank: pathlib.Path) -> list[str]:
    return [a.replace("{treebank}", str(treebank)) for a in MODELS[model][part]]


def _env(store: pathlib.Path) -> dict:
    env = dict(os.environ)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"
    return env


def _finished_run(client, experiment: str) -> str | None:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id], filter_string="attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def _series(client, run_id: str) -> dict:
    run = client.get_run(run_id)
    out = {}
    for key in run.data.metrics:
        if key.startswith(("ntk/", "train/", "test/", "eval/")):
            out[key] = sorted([m.step, m.value] for m in client.get_metric_history(run_id, key))
    return out


def run_one(model: str, seed: int, store: pathlib.Path, treebank: pathlib.Path) -> None:
    out = RESULTS / f"{model}_seed{seed}.json"
    if out.exists():
        print(f"{model} seed {seed}: done ({out.name})")
        return
    import mlflow

    env = _env(store)
    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    client = mlflow.MlflowClient()
    experiment = f"novelty-{model}-seed{seed}"
    task = MODELS[model]["task"]
    train = ["ntk-tracking", "train", task, *_argv(model, "train", treebank), "--seed", str(seed),
             "--experiment", experiment, "--no-progress"]
    run_id = _finished_run(client, experiment)
    t0 = time.perf_counter()
    if run_id is None:
        print("$", " ".join(train), flush=True)
        subprocess.run(train, env=env, cwd=store, check=True)
        run_id = _finished_run(client, experiment)
    train_s = time.perf_counter() - t0
    analyze = ["ntk-tracking", "analyze", run_id, *_argv(model, "analyze", treebank), "--no-progress"]
    print("$", " ".join(analyze), flush=True)
    t0 = time.perf_counter()
    subprocess.run(analyze, env=env, cwd=store, check=True)
    result = {"model": model, "task": task, "seed": seed, "run_id": run_id,
              "train_command": " ".join(train).replace(str(treebank), "<treebank>"),
              "analyze_command": " ".join(analyze),
              "train_seconds": round(train_s, 1), "analyze_seconds": round(time.perf_counter() - t0, 1),
              "series": _series(client, run_id)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(out)
    print(f"{model} seed {seed}: wrote {out}", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train and analyze (resumable)")
    r.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    r.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    r.add_argument("--store", default="novelty_store", help="folder of the study's tracking store")
    r.add_argument("--treebank", default=str(TREEBANK), help="UD Ancient Greek Perseus folder or .conllu file")
    sub.add_parser("report", help="verdicts and the figure from studies/results/novelty")
    args = p.parse_args(argv)
    if args.command == "run":
        store = pathlib.Path(args.store).resolve()
        store.mkdir(parents=True, exist_ok=True)
        for seed in args.seeds:
            for model in args.models:
                run_one(model, seed, store, pathlib.Path(args.treebank).resolve())
    else:
        from novelty_report import report

        report(RESULTS, FIGURE)


if __name__ == "__main__":
    sys.exit(main())
