"""User errors: one line on stderr naming the culprit and the fix, exit code 2.

Anything a user can cause (bad recipe, missing file, bad data) raises `UserError`. Launch scripts
wrap their `main` in `run_cli`, which prints the message once (on the main process only while
the errors are the same on every process) and exits 2 without a traceback; `TrainingDiverged`
(too many non-finite steps) exits 3. Bugs still raise.
"""

from __future__ import annotations

import os
import re
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
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        error = user_error_of(exc)
        if error is None:
            raise
        if _is_main_process() or (_group_formed and not getattr(error, "alike_on_every_rank", False)):
            print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        sys.exit(error.exit_code)
    sys.exit(code or 0)


def user_error_of(exc: BaseException) -> UserError | None:
    """`exc` if it is a UserError, or the UserError a DataLoader worker raised: torch raises it
    again in the training process as its own class when that takes the message alone, else as a
    RuntimeError holding the worker's traceback text ("Caught CorruptSample in DataLoader worker
    process 0. Original Traceback ..."). None for anything else (a bug: it keeps its traceback)."""
    if isinstance(exc, UserError):
        return exc
    caught = re.match(r"Caught (\w+) in DataLoader worker process", str(exc))
    if caught is None or "Original Traceback" not in str(exc):
        return None
    for cls in _subclasses(UserError):
        if cls.__name__ == caught.group(1):
            error = UserError(str(exc))
            error.exit_code = cls.exit_code
            return error
    return None


def _subclasses(cls: type) -> list[type]:
    return [cls] + [s for sub in cls.__subclasses__() for s in _subclasses(sub)]


def one_line(exc: BaseException) -> str:
    """The user's message, also when a DataLoader worker wrapped it in its traceback text (whose
    last line is "module.ErrorClass: message")."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        text = re.sub(r"^[\w.]+: ", "", text.splitlines()[-1].strip(), count=1)
    return text.splitlines()[0] if text else type(exc).__name__
