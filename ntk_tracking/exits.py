"""Exit statuses shared by the commands and the library's child entry (`python -m ntk_tracking.run`),
and the error exit on bad input."""

from __future__ import annotations

import sys
from typing import NoReturn

EXIT_REFUSED = 2  # bad input, refused before anything was created or logged
EXIT_INCOMPLETE = 3  # analysis: some checkpoints damaged, missing or non-finite (the rest analyzed)
EXIT_TRAINER_STOPPED = 4  # analysis --follow: the trainer stopped writing
EXIT_HELD = 5  # analysis: some checkpoints still held by another live analyzer after --held-wait-seconds
EXIT_SERVER_LOST = 6  # the tracking server stopped answering part-way; what is done is kept
EXIT_STORE_UNWRITABLE = 7  # the artifact store stopped accepting checkpoints part-way
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it


def fail(message: str) -> NoReturn:
    """End a command on bad input: `error: MESSAGE` (credentials redacted), exit status 2, and a run
    launched by `mlflow run` for this command marked FAILED with the message."""
    from ntk_tracking.tracking import fail_launched_run, redact

    message = redact(message)
    fail_launched_run(message)
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_REFUSED)
