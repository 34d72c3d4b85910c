"""User errors: one line on stderr naming the culprit and the fix, exit code 2.

Anything a user can cause (bad recipe, missing file, bad data) raises `UserError`. The command
lines (segdist.cli) wrap their `main` in `run_cli`, which prints the message once and exits 2
without a traceback; `TrainingDiverged` (too many non-finite steps) exits 3. Bugs still raise.

Who prints: before the process group forms every rank meets the same user errors, so only the
main process prints them. An error raised once the group exists (a bad sample, say) may be one
rank's alone: the training run marks it `per_rank` (`mark_per_rank`) and every rank prints its own,
unless it is `alike_on_every_rank` (an agreed divergence).

Recognised by type: every UserError can be rebuilt from its message alone, so torch re-raises
one that a DataLoader worker raised as its own class (with the worker's traceback as its text,
which `one_line` trims).
"""

from __future__ import annotations

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


def mark_per_rank(exc: BaseException) -> None:
    """`exc` was raised after the process group formed: it may be this rank's alone."""
    exc.per_rank = True


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run a launch script's `main`, turning `UserError` into one stderr line and its exit code
    (2; 3 for a diverged training)."""
    from segdist.distributed import launch_context, release_gloo_group

    try:
        code = main(argv)
    except KeyboardInterrupt:
        leave(130)
    except Exception as exc:
        error = user_error_of(exc)
        if error is None:
            release_gloo_group()
            raise
        per_rank = getattr(exc, "per_rank", False) and not getattr(error, "alike_on_every_rank", False)
        if launch_context().is_main or per_rank:
            print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        leave(error.exit_code)
    leave(code or 0)


def leave(code: int) -> None:
    """The way out of a command line that did not fail by a bug: a gloo group this process formed
    is released, and then the process leaves at once (`leave_now`) rather than through the
    interpreter's teardown; other runs exit as usual."""
    from segdist.distributed import release_gloo_group

    if release_gloo_group():
        leave_now(code)
    sys.exit(code)


def leave_now(code: int) -> None:
    """Exit with `code` at once: the exit handlers run and the output is flushed, but the
    interpreter's teardown is skipped. For processes that formed a gloo group (multi-process CPU
    runs), measured on a 2-core EPYC:
    - the teardown is where such a process aborted now and then (SIGABRT, "terminate called without
      an active exception", with no Python frame left): 6 of 30 runs of a 2-rank test worker that
      returned after `end_training`, none of 30 that left through here;
    - the teardown of a process that imported torch took 0.5 s, by a different amount on each
      rank, so after a user error the launcher saw one rank exit 2 and stopped the slower one with
      SIGTERM (its exit read -15, not 2) in about half the 2-rank launches."""
    import atexit
    import os

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def user_error_of(exc: BaseException) -> UserError | None:
    """`exc` if it is a UserError (also one a DataLoader worker raised: torch rebuilds it as its own
    class), None for anything else (a bug: it keeps its traceback)."""
    return exc if isinstance(exc, UserError) else None


def one_line(exc: BaseException) -> str:
    """The user's message, also when a DataLoader worker wrapped it in its traceback text (whose
    last line is "module.ErrorClass: message")."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        text = re.sub(r"^[\w.]+: ", "", text.splitlines()[-1].strip(), count=1)
    return text.splitlines()[0] if text else type(exc).__name__
