"""The append-only JSONL store of per-question results that makes every evaluation resumable.

One line per (condition, role, site, α, split, question). A run killed at any moment loses at most the
batch being written: lines are appended, flushed and fsynced per batch, a torn last line is cut off on
the next open, and records whose identity is already stored are never written twice. Entry points::

    RecordStore(path)                 # opens (creating) and repairs; .done(identity), .append(records)
    MemoryStore(records=(), on_append=None)   # the same interface in memory (a distributed worker's)
    record_identity(record) -> tuple  # the fields that make a record unique
    read_records(path) -> Iterator[dict]
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any, Protocol

from ..errors import RolevecError
from .files import decode_text

#: Field order of a record line (also the report's input format).
FIELDS = (
    "condition",
    "role",
    "persona_template",
    "layer",
    "position",
    "alpha",
    "domain",
    "split",
    "qid",
    "subject",
    "gold",
    "pred",
    "correct",
    "p_gold",
    "probs",
)
#: Fields a record carries after :data:`FIELDS` where they apply: the scoring rule (``letter`` or
#: ``continuation``; records written before there was a choice have none and are letter scored), and for
#: continuation scoring the per-character prediction (lm-eval's ``acc_norm``) and each choice's summed
#: log-likelihood. Not part of a record's identity: a run folder pins its scoring rule in settings.json.
EXTRA_FIELDS = ("scoring", "pred_norm", "correct_norm", "logliks")
#: Identity fields a record carries, after :data:`FIELDS`, only when its steering has them: a composition
#: of several roles (``{"mode": "sum"|"orthogonal", "terms": [[role, weight], ...]}``; the record's
#: ``role`` is then the composition's canonical name) and a capping range (``cap``: ``[lo, hi]``, with
#: ``cap_layers``). Records without them keep the form they always had.
STEER_FIELDS = ("compose", "cap", "cap_layers")
CONDITIONS = ("baseline", "persona", "add", "ablate", "random", "cap")

Identity = tuple[Any, ...]


def _num(value: Any) -> float | None:
    return None if value is None else float(value)


def steer_identity(
    compose: Mapping[str, Any] | None = None,
    cap: Sequence[float] | None = None,
    cap_layers: Sequence[int] | None = None,
) -> tuple[Any, ...] | None:
    """The :data:`STEER_FIELDS` of a record as one hashable value (None when it has none, as every record
    written before compositions and capping had), numbers compared as floats and ints."""
    if compose is None and cap is None and cap_layers is None:
        return None
    composed = None
    if compose is not None:
        terms = tuple((str(role), float(weight)) for role, weight in compose.get("terms", ()))
        composed = (str(compose.get("mode", "sum")), terms)
    capped = None if cap is None else tuple(float(x) for x in cap)
    layers = None if cap_layers is None else tuple(int(x) for x in cap_layers)
    return (composed, capped, layers)


def condition_identity(
    condition: str,
    role: str | None,
    persona_template: str | None,
    layer: int | None,
    position: int | None,
    alpha: float | None,
    steer: tuple[Any, ...] | None = None,
) -> Identity:
    """What identifies a condition: its :data:`FIELDS` up to α, then :func:`steer_identity`'s value."""
    return (
        condition,
        role,
        persona_template,
        None if layer is None else int(layer),
        None if position is None else int(position),
        _num(alpha),
        steer,
    )


def record_identity(record: Mapping[str, Any]) -> Identity:
    """All fields before ``domain`` and the :data:`STEER_FIELDS`, plus split and qid (α compared as a
    float: 1 == 1.0). Its last two entries are always split and qid; the rest is the condition's."""
    return (
        *condition_identity(
            record["condition"],
            record.get("role"),
            record.get("persona_template"),
            record.get("layer"),
            record.get("position"),
            record.get("alpha"),
            steer_identity(record.get("compose"), record.get("cap"), record.get("cap_layers")),
        ),
        record["split"],
        record["qid"],
    )


def read_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """Every complete record of a store (a torn last line, left by a killed run, is ignored).

    Args:
        path: The JSONL records file (e.g. a run's ``records.jsonl``); a missing file yields nothing.

    Returns:
        An iterator over the records as dicts, in file order; raises ``RolevecError`` on a damaged line.

    Example:
        ```python
        records = list(read_records("runs/quick/records.jsonl"))
        baseline = [r for r in records if r["condition"] == "baseline"]
        ```
    """
    p = Path(path)
    if not p.exists():
        return
    with p.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                return  # torn tail of a killed run; RecordStore cuts it off
            if not raw.strip():
                continue
            try:
                yield json.loads(decode_text(raw, p, what="records file", lineno=number))
            except json.JSONDecodeError as exc:
                raise RolevecError(
                    f"{p} line {number} is not valid JSON ({exc}); the store is damaged: fix or remove that "
                    "line, or start a new run folder"
                ) from exc


def _repair(path: Path) -> int:
    """Cut a partial last line (no newline) off the file; returns the bytes removed."""
    size = path.stat().st_size
    if size == 0:
        return 0
    with path.open("rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        keep = 0
        block = 1 << 16
        pos = size
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            idx = chunk.rfind(b"\n")
            if idx >= 0:
                keep = start + idx + 1
                break
            pos = start
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
        return size - keep


class RecordStore:
    """An append-only JSONL file of records with the set of identities already stored.

    Holds an exclusive lock on ``<path>.lock`` while open (POSIX), so two processes never append to the
    same run at once. Use as a context manager or call :meth:`close`.

    Args:
        path: The JSONL file; created (with its folder) when missing, and a torn last line is cut off.

    Example:
        ```python
        with RecordStore("runs/mine/records.jsonl") as store:
            report = evaluate_conditions(adapter, mcq, split, [Condition("baseline")], store)
            print(len(store), "records stored")
        ```
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = self._acquire_lock()
        if not self.path.exists():
            self.path.touch()
        self.repaired_bytes = _repair(self.path)
        self._done: set[Identity] = set()
        for record in read_records(self.path):
            self._done.add(record_identity(record))

    def _acquire_lock(self) -> Any:
        lock_path = self.path.with_name(self.path.name + ".lock")
        handle = lock_path.open("a")
        try:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: no lock
            pass
        except OSError as exc:
            handle.close()
            raise RolevecError(
                f"{self.path} is in use by another rolevec process: wait for it or choose another `run_dir`"
            ) from exc
        return handle

    def close(self) -> None:
        with suppress(OSError):
            self._lock.close()

    def __enter__(self) -> RecordStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._done)

    def done(self, identity: Identity) -> bool:
        return identity in self._done

    def identities(self) -> frozenset[Identity]:
        """The identities stored so far (what a distributed worker is told to skip)."""
        return frozenset(self._done)

    def records(self) -> Iterator[dict[str, Any]]:
        """Every stored record, in file order."""
        return read_records(self.path)

    def append(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Write the records not stored yet (one flush + fsync for the lot); returns how many were new."""
        lines: list[str] = []
        for record in records:
            key = _checked_identity(record)
            if key in self._done:
                continue
            self._done.add(key)
            lines.append(json.dumps(ordered(record), ensure_ascii=False, allow_nan=False) + "\n")
        if not lines:
            return 0
        with self.path.open("a", encoding="utf-8") as f:
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())
        return len(lines)


def ordered(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record in store order: :data:`FIELDS`, then the :data:`EXTRA_FIELDS` it has."""
    out = {k: record[k] for k in FIELDS}
    out.update((k, record[k]) for k in STEER_FIELDS if record.get(k) is not None)
    out.update((k, record[k]) for k in EXTRA_FIELDS if k in record)
    return out


def _checked_identity(record: Mapping[str, Any]) -> Identity:
    missing = [k for k in FIELDS if k not in record]
    if missing:
        raise RolevecError(f"record lacks field(s) {', '.join(missing)}: {dict(record)}")
    return record_identity(record)


class Store(Protocol):
    """What the evaluation stages need of a record store: :class:`RecordStore` on disk, or
    :class:`MemoryStore` on a distributed worker, which has no run folder."""

    def done(self, identity: Identity) -> bool: ...

    def append(self, records: Iterable[Mapping[str, Any]]) -> int: ...

    def records(self) -> Iterator[dict[str, Any]]: ...


class MemoryStore:
    """A record store in memory: knows the identities it is told are done and the records it is given,
    and hands each appended batch to ``on_append`` (a worker streams them to the one writer, the driver).

    Args:
        records: Records already stored (their identities count as done; :meth:`records` yields them).
        done: Further identities already stored elsewhere, without their records.
        on_append: Receives each batch of new records, in the store's field order.

    Example:
        ```python
        sent = []
        store = MemoryStore(done=disk.identities(), on_append=sent.append)
        evaluate_conditions(adapter, mcq, split, conditions, store)
        ```
    """

    def __init__(
        self,
        records: Iterable[Mapping[str, Any]] = (),
        *,
        done: Iterable[Identity] = (),
        on_append: Callable[[list[dict[str, Any]]], None] | None = None,
    ) -> None:
        self._records: list[dict[str, Any]] = []
        self._done: set[Identity] = set(done)
        self._on_append = on_append
        for record in records:
            key = _checked_identity(record)
            if key not in self._done:
                self._done.add(key)
                self._records.append(ordered(record))

    def __len__(self) -> int:
        return len(self._done)

    def done(self, identity: Identity) -> bool:
        return identity in self._done

    def records(self) -> Iterator[dict[str, Any]]:
        return iter(list(self._records))

    def append(self, records: Iterable[Mapping[str, Any]]) -> int:
        batch: list[dict[str, Any]] = []
        for record in records:
            key = _checked_identity(record)
            if key in self._done:
                continue
            self._done.add(key)
            batch.append(ordered(record))
        if batch:
            self._records.extend(batch)
            if self._on_append is not None:
                self._on_append(batch)
        return len(batch)


SETTINGS_NAME = "settings.json"


def _short(value: Any, width: int = 48) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 1] + "…"


def _differences(stored: Any, wanted: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ (nested objects compared key by key), for a short message."""
    if isinstance(stored, Mapping) and isinstance(wanted, Mapping):
        out: list[str] = []
        for key in wanted:
            if key in stored:
                out += _differences(stored[key], wanted[key], f"{prefix}{key}.")
        return out
    return [] if stored == wanted else [f"{prefix[:-1]}: {_short(stored)} stored, {_short(wanted)} now"]


def compare_settings(
    run_dir: str | Path, settings: Mapping[str, Any], *, stored_at: Path | None = None
) -> dict[str, Any] | None:
    """Refuse settings that differ from a run folder's ``settings.json``, writing nothing; returns what a
    :func:`check_settings` call would store (None: nothing to write). ``stored_at`` reads the stored
    settings from elsewhere (an interrupted ``--force`` run's trash, see :func:`outdir.stored_path`)."""
    from .files import read_text

    path = stored_at or Path(run_dir) / SETTINGS_NAME
    wanted: dict[str, Any] = json.loads(json.dumps(dict(settings)))
    if not path.exists():
        return wanted
    try:
        stored = json.loads(read_text(path, what="settings file"))
    except ValueError as exc:
        raise RolevecError(f"{path} is not readable ({exc}); fix it or start a new run folder") from exc
    if not isinstance(stored, dict):
        raise RolevecError(f"{path} is not a settings object; fix it or start a new run folder")
    if "prompt" in stored and "scoring" not in stored:
        stored["scoring"] = "letter"  # written before continuation scoring existed: letter scored
    diff = _differences(stored, wanted)
    if diff:
        raise RolevecError(
            f"{run_dir} holds records made with other settings ({'; '.join(diff[:4])}"
            f"{'; …' if len(diff) > 4 else ''}): use the same options, `force=True` to discard that run's "
            "results, or another `run_dir`"
        )
    merged = {**stored, **wanted}
    return None if merged == stored else merged


def check_settings(run_dir: str | Path, settings: Mapping[str, Any]) -> None:
    """Refuse to add records made under different settings (model, prompt, split, seed) to a run folder.

    The first call writes ``settings.json``; later calls must match it on every key they share.
    """
    from .files import atomic_write

    merged = compare_settings(run_dir, settings)
    if merged is None:
        return
    text = json.dumps(merged, indent=1, ensure_ascii=False) + "\n"
    atomic_write(
        Path(run_dir) / SETTINGS_NAME, lambda tmp: tmp.write_text(text, encoding="utf-8"), force=True
    )
