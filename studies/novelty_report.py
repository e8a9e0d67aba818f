"""Verdicts on the paper's Fig. 3 claims, and the five-panel figure, from studies/results/novelty/*.json.

Each claim is evaluated on the primary network's train probe set (Pong: the actor on its
probe states), per seed, with the subsets' standard error as the noise floor: a change counts
only when it exceeds twice the combined standard error of the two means (K subsets each).
"""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np

PANELS = [("cifar_resnet", "ResNet18 (MNIST 5k, width 1/4)"), ("greek_pos", "Transformer tagger (Ancient Greek)"),
          ("molpcba_gnn", "GCN (molecules-offline)"), ("mnist_vae", "VAE (MNIST 5k)"),
          ("pong_actor_critic", "Actor-critic (Pong): actor")]
EARLY_FRACTION = 0.1  # "early": checkpoints in the first 10 % of training (epoch 0 excluded), or, in a
#                        run with step checkpoints, those inside the first epoch
POINTS = 20  # m of every analysis in the study (K comes from each run's command)


def keys(model: str) -> dict:
    if model == "pong_actor_critic":
        return {"entropy": "ntk/actor/entropy/states", "entropy_std": "ntk/actor/entropy_std/states",
                "trace": "ntk/actor/trace/states", "trace_std": "ntk/actor/trace_std/states",
                "loss": "eval/episode_return"}
    return {"entropy": "ntk/entropy/train", "entropy_std": "ntk/entropy_std/train",
            "trace": "ntk/trace/train", "trace_std": "ntk/trace_std/train", "loss": "train/loss"}


def _label(path: pathlib.Path) -> str:
    """A result file's variant: "" for `<model>_seed<k>.json`, L for `<model>_seed<k>_L.json`."""
    return path.stem.rsplit("_seed", 1)[1].partition("_")[2]


def load(results: pathlib.Path, label: str = "") -> dict[str, list[dict]]:
    """The runs of one variant of the study (see _label)."""
    runs: dict[str, list[dict]] = {}
    for path in sorted(results.glob("*_seed*.json")):
        if _label(path) != label:
            continue
        run = json.loads(path.read_text())
        run["K"] = int(run["analyze_command"].split("--subsets")[1].split()[0])
        runs.setdefault(run["model"], []).append(run)
    return runs


def unit(run: dict) -> str:
    """What a checkpoint's step counts: epochs, optimizer steps (a run with step checkpoints), PPO updates."""
    if run["model"] == "pong_actor_critic":
        return "update"
    return "step" if run.get("step_unit") == "optimizer step" else "epoch"


def first_epoch_end(run: dict) -> float | None:
    """The optimizer step that ends epoch 1 in a run logged at optimizer steps (its `epoch` metric), else None."""
    if unit(run) != "step":
        return None
    return next((s for s, e in run["series"].get("epoch", []) if e >= 1), None)


def arrays(run: dict, name: str) -> tuple[np.ndarray, np.ndarray]:
    points = run["series"].get(keys(run["model"])[name], [])
    return np.array([p[0] for p in points], float), np.array([p[1] for p in points], float)


def _se(run, name, i, j):
    """Standard error of the difference of two checkpoints' means (i, j index the checkpoints)."""
    _, std = arrays(run, f"{name}_std")
    return math.sqrt(std[i] ** 2 + std[j] ** 2) / math.sqrt(run["K"])


def running_average(values: np.ndarray, window: int = 3) -> np.ndarray:
    """Centered running mean over `window` checkpoints (shrinking at the ends)."""
    h = window // 2
    return np.array([values[max(0, i - h):i + h + 1].mean() for i in range(len(values))])


def claims_for(run: dict) -> dict:
    """The numbers behind claims (a)-(e) for one run."""
    steps, s = arrays(run, "entropy")
    _, t = arrays(run, "trace")
    last = steps[-1]
    end = first_epoch_end(run)
    horizon = end if end is not None else EARLY_FRACTION * last
    early = [i for i in range(1, len(steps)) if steps[i] <= horizon] or [1]
    mid = int(np.argmin(np.abs(steps - last / 2)))
    out = {"unit": unit(run), "last": int(last), "checkpoints": len(steps),
           "entropy_first": s[0], "entropy_last": s[-1], "entropy_min": s.min(),
           "entropy_min_at": int(steps[int(np.argmin(s))]),
           "entropy_rises": bool(s[-1] - s[0] > 2 * _se(run, "entropy", 0, len(s) - 1))}
    i_min = min(early, key=lambda i: s[i])
    out["early_checkpoints"] = [int(steps[i]) for i in early]
    out["early_entropy_min"], out["early_entropy_min_at"] = s[i_min], int(steps[i_min])
    out["early_compression"] = bool(s[0] - s[i_min] > 2 * _se(run, "entropy", 0, i_min))
    out["trace_first"], out["trace_mid"], out["trace_last"] = t[0], t[mid], t[-1]
    out["trace_mid_at"] = int(steps[mid])
    out["trace_rises_late"] = bool(t[-1] - t[mid] > 2 * _se(run, "trace", mid, len(t) - 1))
    j_min = min(early, key=lambda i: t[i])
    out["early_trace_min"], out["early_trace_min_at"] = t[j_min], int(steps[j_min])
    out["early_trace_dip"] = bool(t[0] - t[j_min] > 2 * _se(run, "trace", 0, j_min))
    rises = np.diff(t) > 0
    out["trace_rising_steps"] = f"{int(rises.sum())}/{len(rises)}"
    loss_steps, loss = arrays(run, "loss")
    at = {int(a): b for a, b in zip(loss_steps, loss)}
    paired = [(tv, at[int(e)]) for e, tv in zip(steps, t) if int(e) in at]
    if len(paired) > 2:
        a, b = np.array(paired).T
        out["spearman_trace_loss"] = float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])
    return out


def _ranks(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x)).astype(float)


def rl_timing(run: dict) -> dict:
    """(f): the update at which the actor's trace first doubles and its entropy covers half its
    rise, against the first return jump (the RL figure's criterion, 200-step episodes)."""
    from ntk_tracking.figures_rl import return_jump_step

    steps, s = arrays(run, "entropy")
    _, t = arrays(run, "trace")
    r_steps, r = arrays(run, "loss")
    jump = return_jump_step(list(zip(r_steps, r)), max_return=200.0)
    trace_double = next((int(e) for e, v in zip(steps, t) if v >= 2 * t[0]), None)
    half = s[0] + (s.max() - s[0]) / 2
    entropy_half = next((int(e) for e, v in zip(steps, s) if v >= half), None)
    return {"return_jump_update": jump, "actor_trace_doubles_update": trace_double,
            "actor_entropy_half_rise_update": entropy_half,
            "precedes": bool(jump is not None and trace_double is not None and entropy_half is not None
                             and max(trace_double, entropy_half) < jump)}


def verdict(flags: list[bool], want: bool = True) -> str:
    hits = sum(f == want for f in flags)
    return "holds" if hits == len(flags) else ("does not hold" if hits == 0 else "mixed")


def evaluate(runs: dict[str, list[dict]]) -> dict:
    table = {}
    for model, _ in PANELS:
        if model not in runs:
            continue
        per_seed = [dict(seed=r["seed"], K=r["K"], **claims_for(r)) for r in runs[model]]
        row = {"seeds": per_seed,
               "a": verdict([c["entropy_rises"] for c in per_seed]),
               "b": verdict([c["early_compression"] for c in per_seed], want=False),
               "c": verdict([c["trace_rises_late"] for c in per_seed])}
        if model == "greek_pos":
            row["d"] = verdict([c["trace_rising_steps"].split("/")[0] == c["trace_rising_steps"].split("/")[1]
                                or c.get("spearman_trace_loss", 0) < -0.9 for c in per_seed])
        if model in ("molpcba_gnn", "mnist_vae"):
            row["e"] = verdict([c["early_trace_dip"] for c in per_seed])
        if model == "pong_actor_critic":
            timing = [rl_timing(r) for r in runs[model]]
            row["rl"] = timing
            row["f"] = verdict([x["precedes"] for x in timing])
        table[model] = row
    return table


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.3e}"


def markdown(table: dict, runs: dict, label: str = "") -> str:
    variant = f", variant `{label}`" if label else ""
    lines = [f"# Fig. 3 claims on the novelty models{variant} (generated by `python studies/novelty.py report`)", "",
             "Primary network, train probe set (Pong: actor, probe states); K subsets of m = 20 points "
             "per checkpoint; a change counts when it exceeds 2 standard errors of the difference. "
             "(b)'s early checkpoints: those inside the first epoch where a run has step checkpoints "
             "(its steps are optimizer steps), else the first 10 % of training.", "",
             "| model | (a) entropy rises | (b) no early compression | (c) trace rises late | "
             "(d) tagger: trace rises as loss falls | (e) early trace dip | (f) actor jump before return |",
             "|---|---|---|---|---|---|---|"]
    for model, title in PANELS:
        if model not in table:
            continue
        row = table[model]
        n = len(row["seeds"])
        cells = [row.get(c, "n/a") + (f" ({n} seeds)" if c in row and n > 1 else "") for c in "abcdef"]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    lines += ["", "## Numbers per run", ""]
    for model, title in PANELS:
        if model not in table:
            continue
        lines.append(f"### {title}")
        for run, c in zip(runs[model], table[model]["seeds"]):
            lines.append(f"- seed {c['seed']} (run `{run['run_id'][:8]}`, K = {c['K']}, {c['checkpoints']} "
                         f"checkpoints to {c['unit']} {c['last']}; training {run['train_seconds']:.0f} s, analysis "
                         f"{run['analyze_seconds']:.0f} s):")
            lines.append(f"  - `{run['train_command']}`; `{run['analyze_command']}`")
            lines.append(f"  - entropy {_fmt(c['entropy_first'])} → {_fmt(c['entropy_last'])} (min "
                         f"{_fmt(c['entropy_min'])} at {c['unit']} {c['entropy_min_at']}); early checkpoints "
                         f"{c['early_checkpoints']}: lowest {_fmt(c['early_entropy_min'])} at {c['unit']} "
                         f"{c['early_entropy_min_at']} → early compression: {c['early_compression']}")
            lines.append(f"  - trace {_fmt(c['trace_first'])} → {_fmt(c['trace_mid'])} ({c['unit']} {c['trace_mid_at']}) "
                         f"→ {_fmt(c['trace_last'])}; rises between consecutive checkpoints "
                         f"{c['trace_rising_steps']}; early minimum {_fmt(c['early_trace_min'])} at {c['unit']} "
                         f"{c['early_trace_min_at']} → early dip: {c['early_trace_dip']}"
                         + (f"; Spearman(trace, {keys(model)['loss']}) = {c['spearman_trace_loss']:.3f}"
                            if "spearman_trace_loss" in c else ""))
        for x in table[model].get("rl", []):
            lines.append(f"  - return jump at update {x['return_jump_update']}; actor trace doubles at update "
                         f"{x['actor_trace_doubles_update']}, actor entropy half its rise at update "
                         f"{x['actor_entropy_half_rise_update']} → precedes: {x['precedes']}")
        lines.append("")
    return "\n".join(lines)


def figure(runs: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    present = [(m, title) for m, title in PANELS if m in runs]
    fig, axes = plt.subplots(2, len(present), figsize=(3.6 * len(present), 6.2), squeeze=False)
    colors = ["tab:blue", "tab:orange", "tab:green"]
    for col, (model, title) in enumerate(present):
        run_unit = unit(runs[model][0])
        for row, (name, label) in enumerate([("entropy", "NTK entropy (nats)"), ("trace", "NTK trace")]):
            ax = axes[row, col]
            for i, run in enumerate(runs[model]):
                steps, values = arrays(run, name)
                x = steps + 1  # step 0 on a log axis
                ax.plot(x, values, "o", ms=3, alpha=0.45, color=colors[i % 3])
                ax.plot(x, running_average(values), "-", lw=1.8, color=colors[i % 3], label=f"seed {run['seed']}")
                end = first_epoch_end(run)
                if end is not None and i == 0:
                    ax.axvline(end + 1, ls=":", color="gray", lw=1)
            ax.set_xscale("log")
            if name == "trace":
                ax.set_yscale("log")
            ax.xaxis.set_major_locator(LogLocator(base=10, numticks=6))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.set_xlabel({"update": "PPO update", "step": "optimizer step", "epoch": "epoch"}[run_unit] + " + 1"
                          + (" (dotted: epoch 1 ends)" if run_unit == "step" else ""), fontsize=8)
            if col == 0:
                ax.set_ylabel(label)
            if row == 0:
                ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3, which="both")
            if model == "pong_actor_critic" and row == 1:
                twin = ax.twinx()
                for i, run in enumerate(runs[model]):
                    steps, ret = arrays(run, "loss")
                    twin.plot(steps + 1, running_average(ret, 9), "--", lw=1.2, color="gray",
                              label="eval return" if i == 0 else None)
                twin.set_ylabel("evaluation return (dashed)", color="gray")
        axes[0, col].legend(fontsize=7, loc="best")
    fig.suptitle("NTK entropy and trace through training (points: checkpoints; lines: running average of 3)",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def labels(results: pathlib.Path) -> list[str]:
    """The study's variants present in `results`: "" (the first study) and each `--label`."""
    return sorted({_label(path) for path in results.glob("*_seed*.json")})


def report(results: pathlib.Path, figure_path: pathlib.Path, prefer: str = "steps") -> None:
    """Verdicts per variant (`verdicts.md`, `verdicts_<label>.md`); the figure shows each model's
    `prefer` variant where it has one, else the first study's runs."""
    shown: dict[str, list[dict]] = {}
    for label in labels(results):
        runs = load(results, label)
        table = evaluate(runs)
        name = "verdicts" + (f"_{label}" if label else "")
        (results / f"{name}.json").write_text(json.dumps(table, indent=2, default=float))
        (results / f"{name}.md").write_text(markdown(table, runs, label))
        print((results / f"{name}.md").read_text())
        for model, model_runs in runs.items():
            if label == prefer or model not in shown:
                shown[model] = model_runs
    figure(shown, figure_path)
    print("figure: " + figure_path.name + ", " + ", ".join(
        f"{m}: {shown[m][0]['K']} subsets, {unit(shown[m][0])}s"
        for m, _ in PANELS if m in shown))
