"""What an analysis will cost, said while it is still cheap to stop: after its first checkpoint."""

from __future__ import annotations

import threading

_compiling = [0.0]  # seconds JAX spent compiling in this process (tracing, lowering, XLA)
_listening = threading.Lock()


def _on_event(event: str, seconds: float, **_) -> None:
    if event.startswith("/jax/core/compile/"):
        _compiling[0] += seconds


def compile_seconds() -> float:
    """JAX's compile time in this process so far (counted from the first call)."""
    with _listening:
        if not getattr(_on_event, "registered", False):
            import jax.monitoring

            jax.monitoring.register_event_duration_secs_listener(_on_event)
            _on_event.registered = True
    return _compiling[0]


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

    After the first: its time without JAX's compilation (paid once) for each further checkpoint.
    After the second: said again only when it differs from the first estimate by more than a quarter."""

    def __init__(self, total: int):
        self.total = total
        self.times: list[float] = []
        self.said: float | None = None
        self._compiled = compile_seconds()

    def after(self, seconds: float, compiling: float | None = None) -> str | None:
        """The line to print after a checkpoint that took `seconds` (`compiling` of them compiling;
        None: as JAX reported), or None."""
        now = compile_seconds()
        compiling, self._compiled = (now - self._compiled if compiling is None else compiling), now
        self.times.append(seconds)
        done, left = len(self.times), self.total - len(self.times)
        if done == 1 and left > 0:
            each = max(seconds - compiling, 0.0)
            self.said = seconds + each * left
            return (f"about {duration(self.said)} for {self.total} checkpoints (the first took {duration(seconds)}, "
                    f"{duration(compiling)} of it compiling)")
        if done == 2 and left > 0:
            estimate = sum(self.times) + seconds * left
            if abs(estimate - self.said) > 0.25 * self.said:
                return f"about {duration(estimate)} for {self.total} checkpoints ({duration(seconds)} each after the first)"
        return None
