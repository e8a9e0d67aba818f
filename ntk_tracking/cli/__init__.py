"""`ntk-tracking COMMAND …`: dispatches to the commands; it holds none of them.

The commands sit side by side in this package, each importing only the library and helpformat:
train, analyze, sweep, report, quickstart. Each is imported when it is called.
"""

from __future__ import annotations

import sys

COMMANDS = {
    "quickstart": "train a small dense network on bundled MNIST digits and analyze it (offline, ~1 min)",
    "train TASK": "train a paper model tracked in MLflow, with Orbax checkpoints at the CV cadence",
    "analyze RUN_ID": "measure the NTK's entropy, trace, … on a run's checkpoints; log them into the run",
    "sweep": "train (and analyze) a grid of configurations as child runs of one parent run; local or Ray",
    "report RUN_ID": "a sweep's table and figures (entropy and trace against the swept options)",
}


def usage() -> str:
    """The top-level help: every command with what it does, and the tasks."""
    from ntk_tracking.tasks import task_names

    width = max(map(len, COMMANDS))
    lines = ["usage: ntk-tracking COMMAND [options]", "",
             "Track how a neural network's neural tangent kernel evolves during training.", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    lines += ["", f"tasks: {', '.join(task_names())}", "",
              "`ntk-tracking COMMAND --help` lists a command's options; `ntk-tracking train TASK --help`, a task's."]
    return "\n".join(lines)


def main(argv=None) -> None:
    """`ntk-tracking COMMAND …`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {name.split()[0] for name in COMMANDS}
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        raise SystemExit(0 if argv else 2)
    if argv[0] not in commands:
        print(f"{usage()}\n\nerror: unknown command {argv[0]!r}", file=sys.stderr)
        raise SystemExit(2)
    command, rest = argv[0], argv[1:]
    if command == "analyze":
        from ntk_tracking.cli.analyze import analyze_main

        analyze_main(rest)
    elif command == "train":
        from ntk_tracking.cli.train import train_command

        train_command(rest)
    elif command == "sweep":
        from ntk_tracking.cli.sweep import sweep_main

        sweep_main(rest)
    elif command == "report":
        from ntk_tracking.cli.report import report_main

        report_main(rest)
    else:
        from ntk_tracking.cli.quickstart import quickstart_main

        quickstart_main(rest)
