"""What an analysis will cost, said while it is still cheap to stop: after its first checkpoint."""

from __future__ import annotations


def duration(seconds: float) -> str:
    """'0.3 s', '40 s', '11 min', '2.5 h'."""
    if seconds < 1:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class CostEstimate:
    """The time for `total` checkpoints from the ones done so far.

    The first checkpoint's time includes compilation, so its estimate is an upper bound; the second's
    gives one without compilation, said again only when it differs by more than a quarter."""

    def __init__(self, total: int):
        self.total = total
        self.times: list[float] = []
        self.said: float | None = None

    def after(self, seconds: float) -> str | None:
        """The line to print after a checkpoint that took `seconds`, or None."""
        self.times.append(seconds)
        done, left = len(self.times), self.total - len(self.times)
        if done == 1 and left > 0:
            self.said = seconds * self.total
            return (f"about {duration(self.said)} for {self.total} checkpoints "
                    f"(the first took {duration(seconds)}, compilation included)")
        if done == 2 and left > 0:
            estimate = sum(self.times) + seconds * left
            if abs(estimate - self.said) > 0.25 * self.said:
                return (f"about {duration(estimate)} for {self.total} checkpoints "
                        f"({duration(seconds)} each after compilation)")
        return None
