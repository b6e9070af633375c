"""File safety shared by every command: atomic writes, write checks up front, and text reads that fail
as one line naming the file (undecodable bytes, a folder where a file belongs) instead of a traceback.

Kept apart from the modules that write results so that none of them imports another's internals for it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..errors import RolevecError, path_problem


def atomic_write(path: Path, write: Callable[[Path], object], *, force: bool = False) -> None:
    """Write through a temporary file in the same folder, so no partial file ever has the final name."""
    path = Path(path)
    if path.exists() and not force:
        raise RolevecError(
            f"{path} already exists: pass `force=True` to overwrite it, or choose another `out`"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes files owner-only; outputs are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_writable(path: str | Path) -> None:
    """Refuse an output that cannot be written, before the slow work: a file in the way of its folder,
    or a folder that takes no new files. Creates nothing."""
    target = Path(path).expanduser()
    probe = target if target.is_dir() else target.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise RolevecError(f"cannot write {target}: {probe} is a file, not a folder; pass another `out`")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".rolevec-write-check.", dir=probe)
    except OSError as exc:
        raise RolevecError(
            f"cannot write {target}: {probe} takes no new files ({exc.strerror or exc}); "
            "pass a writable `out`"
        ) from None
    os.close(fd)
    os.unlink(tmp)


def decode_text(data: bytes, path: str | Path, *, what: str = "file", lineno: int | None = None) -> str:
    """UTF-8 with a leading byte-order mark dropped; anything else undecodable is one clear error."""
    try:
        return data.decode("utf-8-sig" if lineno in (None, 1) else "utf-8")
    except UnicodeDecodeError as exc:
        line = lineno if lineno is not None else data.count(b"\n", 0, exc.start) + 1
        raise RolevecError(
            f"{what} {path} is not UTF-8 text (undecodable byte 0x{data[exc.start]:02x} on line {line}): "
            "save it as UTF-8"
        ) from None


def read_text(path: str | Path, *, what: str = "file") -> str:
    """A whole text file as UTF-8 (BOM-transparent), or one error naming it and what is wrong."""
    p = Path(path)
    if not p.is_file():
        raise RolevecError(f"{what} {p} {path_problem(p)}")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise RolevecError(f"cannot read {what} {p} ({exc.strerror or exc}): check its permissions") from None
    return decode_text(data, p, what=what)
