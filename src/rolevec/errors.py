"""The one exception type users see: the CLI prints its message as a single line and exits non-zero."""

from __future__ import annotations


class RolevecError(Exception):
    """Bad input or an unmet requirement, with a message that says what to do instead."""
