"""How every command talks: --help with defaults as the command line takes them, option values
converted with the library's converters, and the error exit (ntk_tracking.exits, re-exported)."""

from __future__ import annotations

import argparse

from ntk_tracking.exits import (EXIT_HELD, EXIT_INCOMPLETE, EXIT_INTERRUPTED, EXIT_REFUSED, EXIT_SERVER_LOST,
                                EXIT_STORE_UNWRITABLE, EXIT_TRAINER_STOPPED, fail)
from ntk_tracking.tasks import base

__all__ = ["EXIT_HELD", "EXIT_INCOMPLETE", "EXIT_INTERRUPTED", "EXIT_REFUSED", "EXIT_SERVER_LOST",
           "EXIT_STORE_UNWRITABLE", "EXIT_TRAINER_STOPPED", "HelpFormatter", "add_ray_options", "argument_type",
           "fail", "yes_no"]


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


def argument_type(convert):
    """A library converter (text -> value, ValueError with a message) as an argparse type that
    prints that message (`argument --x: expected yes or no, got 'maybe'`); a type such as int or
    float is kept, so that argparse names it (`invalid int value: 'x'`)."""
    if isinstance(convert, type):
        return convert

    def parse(text):
        try:
            return convert(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


yes_no = argument_type(base.yes_no)  # a boolean option's value: yes/no, true/false, 1/0, on/off


def add_ray_options(group, per: str, who: str) -> None:
    """--ray-address and the resources each Ray task asks for (--cpus-per-PER, --gpus-per-PER)."""
    group.add_argument("--ray-address", "--ray_address", dest="ray_address", default="",
                       help="with --executor ray: the cluster (auto, HOST:PORT, ray://HOST:PORT); empty: "
                       "RAY_ADDRESS, else a Ray started on this machine")
    for kind, default in (("cpus", 1.0), ("gpus", 0.0)):
        group.add_argument(f"--{kind}-per-{per}", f"--{kind}_per_{per}", dest=f"{kind}_per_{per}", type=float,
                           default=default, help=f"with --executor ray: {kind[:3].upper()}s {who} asks for")
