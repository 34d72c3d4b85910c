"""Checks of the benches' command-line options."""

from __future__ import annotations

import argparse

from segdist.errors import UserError


def require_positive(args: argparse.Namespace, *names: str) -> None:
    """A UserError naming the first option (an argparse dest) of `names` set below 1."""
    for name in names:
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
