"""How every command's --help shows its options: defaults as the command line takes them."""

from __future__ import annotations

import argparse


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
