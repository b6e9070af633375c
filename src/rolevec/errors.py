"""The one exception type users see: the CLI prints its message as a single line and exits non-zero."""

from __future__ import annotations

from pathlib import Path


class RolevecError(Exception):
    """Bad input or an unmet requirement, with a message that says what to do instead.

    A message names an option the way a Python caller passes it, in backticks (`run_dir`, `force=True`);
    the command line prints the same message with its flags (``rolevec.cli.common.to_flags``).
    """


def path_problem(path: str | Path, *, folder: bool = False) -> str:
    """Why a path is unusable: "does not exist", or that it is the wrong kind (a folder for a file)."""
    p = Path(path)
    if not p.exists():
        return "does not exist"
    return "is a file, not a folder" if folder else "is a folder, not a file"
