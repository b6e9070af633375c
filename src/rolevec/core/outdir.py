"""Output folders: which files rolevec wrote there and for which command, and the one ``--force`` rule.

Every command that writes a folder lists the files it writes in ``rolevec-files.json`` beside them,
before it writes them. ``--force`` then moves aside only files listed there that the command itself
writes (and the report derived from them): never a user's file, never a checkpoint over a run folder or
the reverse, never while another process holds the folder's records lock, and only after every input
was checked (commands open the folder with :func:`prepare` last, just before their first write).
Replaced files go to ``.rolevec-trash/<command>/`` and are deleted only when the command succeeds; a
rerun without ``--force`` puts them back, a rerun with ``--force`` finishes the replacement.

Folders written before this file existed are recognised by their rolevec manifest and adopted.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..errors import RolevecError
from .files import atomic_write, check_writable, read_text

OWNERS_NAME = "rolevec-files.json"
TRASH_NAME = ".rolevec-trash"
LOCK_NAME = "records.jsonl.lock"
FORMAT = "rolevec.folder/1"

REPORT_FILES = ("report.html", "report.md", "tables", "figures")
_EVALUATION = ("records.jsonl", "split.json", "settings.json")

#: What each command writes into a run folder (a name may be a folder, e.g. ``tables``).
WRITES: dict[str, tuple[str, ...]] = {
    "run": (
        "prompts.json",
        "vectors.safetensors",
        *_EVALUATION,
        "sweep.jsonl",
        "selection.json",
        "diagnostics.json",
        "interpret.json",
        "manifest.json",
        *REPORT_FILES,
    ),
    "sweep": (*_EVALUATION, "sweep.jsonl", "selection.json", "manifest-sweep.json"),
    "evaluate": (*_EVALUATION, "summary.json", "manifest-evaluate.json"),
    "report": REPORT_FILES,
}
#: Files derived from what a command replaces: stale once it replaces them, so they go too.
STALE: dict[str, tuple[str, ...]] = {
    "run": (),
    "sweep": ("interpret.json", "diagnostics.json", "summary.json", *REPORT_FILES),
    "evaluate": REPORT_FILES,
    "report": (),
}
#: Files transformers and rolevec write into a folded checkpoint (for folders older than OWNERS_NAME).
_CHECKPOINT_PATTERNS = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "manifest.json",
)
_KIND_WORDS = {"run": "a rolevec run folder", "checkpoint": "a folded checkpoint (rolevec fold)"}


@dataclass
class Owners:
    """What rolevec knows it wrote in a folder: the folder's kind and, per file, the commands."""

    kind: str | None = None  # "run", "checkpoint", or None (empty, or not rolevec's)
    files: dict[str, list[str]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "kind": self.kind, "files": dict(sorted(self.files.items()))}


def _rolevec_manifest(path: Path) -> dict[str, Any] | None:
    """A manifest rolevec wrote (it names rolevec's version), or None."""
    if not path.is_file():
        return None
    try:
        doc = json.loads(read_text(path, what="manifest"))
    except (RolevecError, ValueError):
        return None
    versions = doc.get("versions") if isinstance(doc, dict) else None
    return doc if isinstance(versions, dict) and "rolevec" in versions else None


def _legacy(folder: Path) -> Owners:
    """Adopt a folder written before ``rolevec-files.json`` existed, by its rolevec manifest."""
    manifest = _rolevec_manifest(folder / "manifest.json")
    if manifest is not None and "fold" in manifest:
        names = sorted({p.name for pattern in _CHECKPOINT_PATTERNS for p in folder.glob(pattern)})
        return Owners("checkpoint", {n: ["fold"] for n in names})
    commands = [c for c in ("evaluate", "sweep") if _rolevec_manifest(folder / f"manifest-{c}.json")]
    if manifest is not None:
        commands.insert(0, "run")
    if not commands:
        return Owners()
    files: dict[str, list[str]] = {}
    for command in commands:
        for name in WRITES[command]:
            if (folder / name).exists():
                files.setdefault(name, []).append(command)
    if (folder / "report.html").exists():
        for name in REPORT_FILES:
            if (folder / name).exists() and "report" not in files.setdefault(name, []):
                files[name].append("report")
    return Owners("run", files)


def read_owners(folder: str | Path) -> Owners:
    """The folder's ownership record (or what an older rolevec's manifest tells); one error if damaged."""
    root = Path(folder)
    path = root / OWNERS_NAME
    if not path.exists():
        return _legacy(root) if root.is_dir() else Owners()
    try:
        doc = json.loads(read_text(path, what="ownership file"))
    except ValueError as exc:
        raise RolevecError(
            f"{path} is not valid JSON ({exc}): rolevec cannot tell which files there are its own; "
            "restore the file, or pass another folder"
        ) from None
    files = doc.get("files") if isinstance(doc, dict) else None
    kind = doc.get("kind") if isinstance(doc, dict) else None
    if (
        not isinstance(files, dict)
        or kind not in ("run", "checkpoint", None)
        or not all(isinstance(v, list) for v in files.values())
    ):
        raise RolevecError(
            f"{path} is not a rolevec ownership file (no 'kind' and 'files'): "
            "restore it, or pass another folder"
        )
    return Owners(kind, {str(k): [str(c) for c in v] for k, v in files.items()})


def write_owners(folder: str | Path, owners: Owners) -> None:
    text = json.dumps(owners.to_json(), indent=1, ensure_ascii=False) + "\n"
    atomic_write(Path(folder) / OWNERS_NAME, lambda tmp: tmp.write_text(text, encoding="utf-8"), force=True)


def _replaced(command: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys((*WRITES[command], *STALE[command])))


def check_run_folder(folder: str | Path, command: str, *, force: bool) -> Path:
    """Refuse, before any work, a folder ``command`` must not write into or must not ``--force``.

    Creates and changes nothing: the model may still fail to load, and the inputs to be checked.
    """
    root = Path(folder).expanduser()
    named = "`run_dir`"
    other = "another `run_dir`"
    if root.exists() and not root.is_dir():
        raise RolevecError(f"{named} {root} is a file: pass a folder")
    check_writable(root)
    if not root.exists():
        return root
    owners = read_owners(root)
    if owners.kind == "checkpoint":
        raise RolevecError(
            f"{named} {root} is {_KIND_WORDS['checkpoint']}, not a run folder: rolevec {command} never "
            f"writes into it; choose {other}"
        )
    if force:
        foreign = [n for n in _replaced(command) if (root / n).exists() and n not in owners.files]
        if foreign:
            raise RolevecError(
                f"`force=True` would replace {', '.join(foreign)} in {root}, which rolevec did not write "
                f"(not listed in {OWNERS_NAME}): move them away or choose {other}"
            )
    return root


def check_checkpoint_out(out: str | Path, *, force: bool) -> Path:
    """Refuse a ``fold`` output that exists without ``force``, or that ``--force`` must not replace:
    a run folder, someone's folder, or a checkpoint holding files rolevec did not write."""
    target = Path(out).expanduser()
    check_writable(target)
    if not target.exists():
        return target
    if not force:
        raise RolevecError(
            f"{target} already exists: pass `force=True` to overwrite it, or choose another `out`"
        )
    if not target.is_dir():
        raise RolevecError(f"{target} exists and is not a folder: choose another `out`")
    present = sorted(p.name for p in target.iterdir())
    if not present:
        return target
    owners = read_owners(target)
    if owners.kind != "checkpoint":
        what = _KIND_WORDS.get(owners.kind or "", "a folder rolevec did not write")
        raise RolevecError(
            f"{target} is {what}; `force=True` replaces only an earlier `rolevec fold` output: "
            "choose another `out`"
        )
    foreign = [n for n in present if n not in owners.files and n != OWNERS_NAME]
    if foreign:
        raise RolevecError(
            f"{target} holds files rolevec did not write ({', '.join(foreign[:5])}); `force=True` would lose "
            "them with the old checkpoint: move them out first, or choose another `out`"
        )
    return target


def claim_checkpoint(folder: str | Path) -> None:
    """List every file of a freshly written checkpoint as the fold's own."""
    root = Path(folder)
    names = sorted(p.name for p in root.iterdir() if p.name != OWNERS_NAME)
    write_owners(root, Owners("checkpoint", {n: ["fold"] for n in names}))


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """The folder's records lock, so nothing is moved while another rolevec process writes records."""
    handle = (root / LOCK_NAME).open("a")
    try:
        try:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: no lock
            pass
        except OSError:
            raise RolevecError(
                f"{root} is in use by another rolevec process: wait for it to finish, then rerun"
            ) from None
        yield
    finally:
        handle.close()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _note(line: str) -> None:
    """Tell the user what was done with an interrupted run's files (the CLI prints it as one line)."""
    warnings.warn(line, UserWarning, stacklevel=3)


def _trash_state(trash: Path) -> dict[str, Any]:
    try:
        doc = json.loads(read_text(trash / "trash.json", what="trash record"))
    except (RolevecError, ValueError):
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("names"), list):
        # moved aside but not recorded: whatever is there is the old results
        return {"names": sorted(p.name for p in trash.iterdir() if p.name != "trash.json"), "done": True}
    return doc


def stored_path(folder: str | Path, name: str, command: str, *, force: bool) -> Path:
    """Where ``name`` will be once :func:`prepare` has run, found without changing anything.

    After an interrupted ``--force`` the folder holds that run's partial outputs and the old results
    wait in the trash to be put back: checks made before :func:`prepare` (stored settings, the stored
    split) must read what the command will really find.
    """
    root = Path(folder)
    trash_root = root / TRASH_NAME
    if not trash_root.is_dir():
        return root / name
    for old in sorted(p for p in trash_root.iterdir() if p.is_dir()):
        if force and old.name == command:
            continue  # finished, not restored: the stored results are being replaced
        state = _trash_state(old)
        if name in state["names"] and (old / name).exists():
            return old / name
        if state.get("done") and name in _replaced(old.name):
            return old / name  # the interrupted run's own output, dropped on restore: absent
    return root / name


def _drop_partial(root: Path, command: str, owners: Owners) -> None:
    """Remove what an interrupted replacement of ``command`` wrote (rolevec's own files only)."""
    for name in _replaced(command):
        if name in owners.files:
            _remove(root / name)


def _restore(root: Path, trash: Path, owners: Owners) -> int:
    """Put an interrupted replacement's old files back; the interrupted run's own outputs are dropped."""
    state = _trash_state(trash)
    if trash.name in WRITES and state.get("done"):
        _drop_partial(root, trash.name, owners)
    restored = 0
    for name in state["names"]:
        old = trash / name
        if old.exists() or old.is_symlink():
            _remove(root / name)
            os.replace(old, root / name)
            owners.files.setdefault(name, [trash.name])
            restored += 1
    shutil.rmtree(trash)
    return restored


def _move_aside(root: Path, trash: Path, names: Sequence[str]) -> None:
    """Move ``names`` into ``trash``, recording the plan first so a kill midway loses nothing."""
    trash.mkdir(parents=True, exist_ok=True)
    record = {"names": list(names), "time": datetime.now(UTC).isoformat(timespec="seconds"), "done": False}

    def save() -> None:
        text = json.dumps(record, indent=1) + "\n"
        atomic_write(trash / "trash.json", lambda tmp: tmp.write_text(text, encoding="utf-8"), force=True)

    save()
    for name in names:
        if (root / name).exists() or (root / name).is_symlink():
            os.replace(root / name, trash / name)
    record["done"] = True
    save()


def _finish_moving(root: Path, trash: Path, owners: Owners) -> list[str]:
    """An interrupted --force is rerun with --force: finish moving the old files, drop partial outputs."""
    state = _trash_state(trash)
    names = [str(n) for n in state["names"]]
    if state.get("done"):
        _drop_partial(root, trash.name, owners)
    else:
        _move_aside(root, trash, names)  # the files not moved yet are still the old results
    return names


@contextmanager
def prepare(folder: str | Path, command: str, *, force: bool) -> Iterator[Path]:
    """Open a run folder for ``command``'s writes; with ``force``, move its earlier results aside first.

    Call it after every input is checked. On success the moved-aside files are deleted; on an error or
    an interrupt they stay in ``.rolevec-trash/<command>/`` for the next run to restore or finish.
    """
    root = check_run_folder(folder, command, force=force)
    root.mkdir(parents=True, exist_ok=True)
    trash_root = root / TRASH_NAME
    trash = trash_root / command
    with _locked(root):
        owners = read_owners(root)
        stored = owners.to_json() if (root / OWNERS_NAME).exists() else None
        pending = sorted(p for p in trash_root.iterdir() if p.is_dir()) if trash_root.is_dir() else []
        for old in pending:
            if force and old == trash:
                names = _finish_moving(root, trash, owners)
                _note(
                    f"finishing an interrupted `force=True` in {root}: the earlier results "
                    f"({', '.join(names) or 'none'}) stay in {trash} until this run succeeds"
                )
            else:
                n = _restore(root, old, owners)
                _note(
                    f"restored {n} earlier result file(s) that an interrupted `force=True` had set aside "
                    f"in {root}"
                )
        if force and not trash.exists():
            names = [n for n in _replaced(command) if (root / n).exists() and n in owners.files]
            _move_aside(root, trash, names)
            for name in names:
                owners.files.pop(name, None)
        owners.kind = "run"
        for name in WRITES[command]:
            writers = owners.files.get(name)
            if writers is None and (root / name).exists():
                continue  # not rolevec's: never claimed, so --force will never remove it
            writers = owners.files.setdefault(name, [])
            if command not in writers:
                writers.append(command)
        if owners.to_json() != stored:  # a resume that claims nothing new leaves the file as it was
            write_owners(root, owners)
    yield root
    if trash.exists():
        shutil.rmtree(trash)
    with suppress(OSError):
        trash_root.rmdir()
