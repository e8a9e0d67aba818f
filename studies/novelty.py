"""Paper Fig. 3 (section 4) with this tool: entropy and trace through training of the novelty models.

    python studies/novelty.py run [--models M ...] [--seeds 0 1]   # train + analyze, resumable
    python studies/novelty.py run --cv-log-steps 8 --subsets 200 --points 20 --label steps
                                    # + 8 log-spaced step checkpoints in the first epoch, the paper's K x m
    python studies/novelty.py report                               # verdicts + figure from the results

`run` trains each model with the product's own command (`ntk-tracking train TASK ...`) into a
tracking store outside the project (`--store`, default `./novelty_store`), analyzes it with
`ntk-tracking analyze RUN --subsets K --points m`, and writes the run's series, read back from
MLflow, to `studies/results/novelty/<model>_seed<k>.json`. `--cv-steps`/`--cv-log-steps` add
CV checkpoints at optimizer steps to every model's training, `--subsets`/`--points`/`--splits` replace each
model's K, m and probe sets, `--train-args` appends training options, and `--label` names such a variant: its
experiments and result files get the label as a suffix (`<model>_seed<k>_<label>.json`), so it
never mixes with the default study. A (model, seed) whose JSON exists is
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


def _argv(model: str, part: str, treebank: pathlib.Path, extra: dict | None = None) -> list[str]:
    """The model's options for `part` (train or analyze), `extra` flags replacing or adding to them."""
    argv = [a.replace("{treebank}", str(treebank)) for a in MODELS[model][part]]
    for flag, value in (extra or {}).items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return argv


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
        if key.startswith(("ntk/", "train/", "test/", "eval/")) or key == "epoch":
            out[key] = sorted([m.step, m.value] for m in client.get_metric_history(run_id, key))
    return out


def run_one(model: str, seed: int, store: pathlib.Path, treebank: pathlib.Path, train_extra: dict | None = None,
            analyze_extra: dict | None = None, label: str = "", results: pathlib.Path = RESULTS) -> None:
    out = results / f"{model}_seed{seed}{'_' + label if label else ''}.json"
    if out.exists():
        print(f"{model} seed {seed}: done ({out.name})")
        return
    import mlflow

    env = _env(store)
    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    client = mlflow.MlflowClient()
    experiment = f"novelty-{model}-seed{seed}" + (f"-{label}" if label else "")
    task = MODELS[model]["task"]
    train = ["ntk-tracking", "train", task, *_argv(model, "train", treebank, train_extra), "--seed", str(seed),
             "--experiment", experiment, "--no-progress"]
    run_id = _finished_run(client, experiment)
    t0 = time.perf_counter()
    if run_id is None:
        print("$", " ".join(train), flush=True)
        subprocess.run(train, env=env, cwd=store, check=True)
        run_id = _finished_run(client, experiment)
    train_s = time.perf_counter() - t0
    analyze = ["ntk-tracking", "analyze", run_id, *_argv(model, "analyze", treebank, analyze_extra), "--no-progress"]
    print("$", " ".join(analyze), flush=True)
    t0 = time.perf_counter()
    subprocess.run(analyze, env=env, cwd=store, check=True)
    result = {"model": model, "task": task, "seed": seed, "run_id": run_id,
              "train_command": " ".join(train).replace(str(treebank), "<treebank>"),
              "analyze_command": " ".join(analyze),
              "train_seconds": round(train_s, 1), "analyze_seconds": round(time.perf_counter() - t0, 1),
              "step_unit": client.get_run(run_id).data.tags.get("ntk_tracking.step_unit", "epoch"),
              "series": _series(client, run_id)}
    results.mkdir(parents=True, exist_ok=True)
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
    r.add_argument("--cv-steps", default=None, help="CV checkpoints at these optimizer steps too (e.g. 1,2,4,8)")
    r.add_argument("--cv-log-steps", type=int, default=None, help="N log-spaced step checkpoints in the first epoch")
    r.add_argument("--subsets", type=int, default=None, help="K subsets per probe set (default: each model's own)")
    r.add_argument("--points", type=int, default=None, help="m points per subset (default: each model's own)")
    r.add_argument("--splits", default=None, help="probe sets to analyze, e.g. train (default: each model's own)")
    r.add_argument("--train-args", default="", help="more training options for every model, e.g. '--epochs 2'")
    r.add_argument("--label", default="", help="suffix of this variant's experiments and result files")
    r.add_argument("--results", default=str(RESULTS), help="folder of the result files")
    sub.add_parser("report", help="verdicts and the figure from studies/results/novelty")
    args = p.parse_args(argv)
    if args.command == "run":
        import shlex

        store = pathlib.Path(args.store).resolve()
        store.mkdir(parents=True, exist_ok=True)
        extra = shlex.split(args.train_args)
        train_extra = dict(zip(extra[::2], extra[1::2]))
        for flag, value in (("--cv-steps", args.cv_steps), ("--cv-log-steps", args.cv_log_steps)):
            if value is not None:
                train_extra[flag] = str(value)
        analyze_extra = {flag: str(v) for flag, v in (("--subsets", args.subsets), ("--points", args.points),
                                                      ("--splits", args.splits)) if v is not None}
        for seed in args.seeds:
            for model in args.models:
                run_one(model, seed, store, pathlib.Path(args.treebank).resolve(), train_extra, analyze_extra,
                        args.label, pathlib.Path(args.results).resolve())
    else:
        from novelty_report import report

        report(RESULTS, FIGURE)


if __name__ == "__main__":
    sys.exit(main())
