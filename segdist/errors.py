"""User errors: one line on stderr naming the culprit and the fix, exit code 2.

Anything a user can cause (bad recipe, missing file, bad data) raises `UserError`. Launch scripts
wrap their `main` in `run_cli`, which prints the message once (on the main process only while
the errors are the same on every process) and exits 2 without a traceback; `TrainingDiverged`
(too many non-finite steps) exits 3. Bugs still raise.
"""

from __future__ import annotations

import os
import sys
from typing import Callable


class UserError(Exception):
    """A problem the user can fix; the message names the culprit and what to do."""

    exit_code = 2


class TrainingDiverged(UserError):
    """Too many consecutive non-finite steps; the last good weights were checkpointed first."""

    exit_code = 3
    alike_on_every_rank = True  # the ranks agreed on it: the main process alone says so


# Before the process group forms every rank sees the same user errors, so only the main process
# prints them; after it formed an error (a bad sample, say) may be one rank's alone: all print.
_group_formed = False


def errors_are_per_rank() -> None:
    """Called once the process group exists: from now on every rank prints its own user error."""
    global _group_formed
    _group_formed = True


def _is_main_process() -> bool:
    # Before any process group exists the launcher's environment is all we know.
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run a launch script's `main`, turning `UserError` into one stderr line and its exit code
    (2; 3 for a diverged training)."""
    try:
        code = main(argv)
    except UserError as exc:
        if _is_main_process() or (_group_formed and not getattr(exc, "alike_on_every_rank", False)):
            print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code or 0)


def one_line(exc: BaseException) -> str:
    """The user's message, also when a DataLoader worker wrapped it in its traceback text."""
    text = str(exc).strip()
    marker = "UserError: "
    if "Original Traceback" in text and marker in text:
        text = text.rsplit(marker, 1)[1].strip()
    return text.splitlines()[0] if text else type(exc).__name__
