"""How every command talks: --help with defaults as the command line takes them, and the error exit."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


# Exit statuses shared by the commands (each command's --help lists its own).
EXIT_REFUSED = 2  # bad input, refused before anything was created or logged
EXIT_SERVER_LOST = 6  # the tracking server stopped answering part-way; what is done is kept
EXIT_STORE_UNWRITABLE = 7  # the artifact store stopped accepting checkpoints part-way
EXIT_INCOMPLETE = 3  # analysis: some checkpoints damaged, missing or non-finite (the rest analyzed)
EXIT_HELD = 5  # analysis: some checkpoints still held by another live analyzer after --held-wait-seconds
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown where there is one to show: not for flags, unset values (None, []) or an
    option whose help states its default itself ("default: …"); booleans as yes/no."""

    def _get_help_string(self, action):
        help = action.help or ""
        default = action.default
        if default is None or default is argparse.SUPPRESS or default == [] or action.nargs == 0 \
                or "default:" in help or "%(default)" in help:
            return help
        if isinstance(default, bool):
            return help + f" (default: {'yes' if default else 'no'})"
        return help + " (default: %(default)s)"


def yes_no(text: str) -> bool:
    """A boolean option's value: yes/no, true/false, 1/0, on/off."""
    if str(text).lower() in ("1", "true", "yes", "y", "on"):
        return True
    if str(text).lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected yes or no, got {text!r}")


def fail(message: str) -> NoReturn:
    """End a command on bad input: `error: MESSAGE` (credentials redacted), exit status 2, and a run
    launched by `mlflow run` for this command marked FAILED with the message."""
    from ntk_tracking.tracking import fail_launched_run, redact

    message = redact(message)
    fail_launched_run(message)
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def add_ray_options(group, per: str, who: str) -> None:
    """--ray-address and the resources each Ray task asks for (--cpus-per-PER, --gpus-per-PER)."""
    group.add_argument("--ray-address", "--ray_address", dest="ray_address", default="",
                       help="with --executor ray: the cluster (auto, HOST:PORT, ray://HOST:PORT); empty: "
                       "RAY_ADDRESS, else a Ray started on this machine")
    for kind, default in (("cpus", 1.0), ("gpus", 0.0)):
        group.add_argument(f"--{kind}-per-{per}", f"--{kind}_per_{per}", dest=f"{kind}_per_{per}", type=float,
                           default=default, help=f"with --executor ray: {kind[:3].upper()}s {who} asks for")
