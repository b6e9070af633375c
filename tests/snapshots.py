"""Folder snapshots for tests that promise a command touched nothing (or only what it owns)."""

from __future__ import annotations

import hashlib
from pathlib import Path

Snapshot = dict[str, tuple[str, int, int, str] | tuple[str]]


def snapshot(root: Path) -> Snapshot:
    """Every file (size, mtime_ns, sha256) and folder under ``root``, by relative path."""
    out: Snapshot = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            out[rel] = ("link", 0, 0, str(path.readlink()))
        elif path.is_dir():
            out[rel] = ("dir",)
        else:
            st = path.stat()
            out[rel] = ("file", st.st_size, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def changes(before: Snapshot, after: Snapshot) -> list[str]:
    """'+path' created, '-path' deleted, '~path' modified."""
    created = [f"+{p}" for p in after if p not in before]
    deleted = [f"-{p}" for p in before if p not in after]
    modified = [f"~{p}" for p in before if p in after and before[p] != after[p]]
    return created + deleted + modified
