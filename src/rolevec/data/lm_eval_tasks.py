"""lm-evaluation-harness multiple-choice tasks as a question source (``lm-eval:TASK``).

The documents and their ``doc_to_text`` / ``doc_to_choice`` / ``doc_to_target`` are read through lm-eval's
own task loader (``lm_eval.tasks.TaskManager``), so a task means here what it means to lm-eval: its Jinja
templates, ``process_docs`` and splits. Only 0-shot prompts are built (rolevec's prompt is the user turn).

lm-eval scores a multiple-choice task by continuation: the log-likelihood of ``target_delimiter + choice``
after the prompt (:data:`SCORING`). Letter scoring gives the same ranking only where the choices are the
item's answer letters (``A``, ``B``, ...), as in MMLU-style tasks; :func:`letter_scoring_valid` says so.

How a loaded item lines up with ``lm_eval`` (read from lm-eval 0.4.13's ``ConfigurableTask``):

* ``instruction`` is lm-eval's plain 0-shot context (the task's ``description``, then ``doc_to_text``),
  used verbatim as rolevec's user turn; ``question`` is ``doc_to_text`` alone.
* ``delimiter`` is the task's ``target_delimiter``. lm-eval with ``apply_chat_template=True`` drops it
  (the continuation follows the assistant header directly): pass ``chat_template=True`` for items that
  match that run, as rolevec renders every prompt with the chat template.
* With a chat template lm-eval makes ``description`` a system turn; rolevec keeps it in the user turn
  (the system turn is the persona condition's), so such tasks match lm-eval's plain prompts, not its chat
  prompts.

Entry points::

    load_lm_eval_task(task, include_path=None, domains=None, *, skip_bad=False, chat_template=False) -> MCQSet
    letter_scoring_valid(items) -> bool
"""

from __future__ import annotations

import difflib
import importlib
import logging
import warnings
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import RolevecError
from .items import ALL_LETTERS, MCQItem, MCQSet, _Bad, check_choices

#: The scoring rule lm-eval applies to multiple-choice tasks: each choice's summed log-likelihood after the
#: prompt (``acc``; ``acc_norm`` divides by the choice's length in characters).
SCORING = "continuation"
#: The source prefix and ``MCQSet.kind`` of these questions.
PREFIX = "lm-eval:"
KIND = "lm-eval"
INSTALL = "pip install 'rolevec[interop]'"


def _lm_eval_tasks() -> Any:
    """lm-eval's task package, imported only when a task is asked for (it is an optional extra)."""
    try:
        return importlib.import_module("lm_eval.tasks")
    except ImportError as exc:
        raise RolevecError(
            f"lm-eval tasks need lm-evaluation-harness: run `{INSTALL}`, or pass another question source"
        ) from exc


@contextmanager
def _quiet() -> Any:
    """lm-eval logs every task it indexes and warns on defaults it fills in: keep loading silent."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _manager(tasks_module: Any, task: str, include_path: str | Path | None) -> Any:
    """A task index with ``include_path``; lm-eval's own tasks are indexed only when needed (seconds)."""
    if include_path is not None:
        folder = Path(include_path).expanduser()
        if not folder.exists():
            raise RolevecError(
                f"lm-eval include path {folder} does not exist: pass the folder of the task's YAML files"
            )
        local = tasks_module.TaskManager(include_path=str(folder), include_defaults=False)
        if task in local.all_tasks:
            return local
    return tasks_module.TaskManager(include_path=None if include_path is None else str(include_path))


def _load(task: str, include_path: str | Path | None) -> dict[str, Any]:
    """``{subtask name: lm-eval Task}`` for a task, group or tag name."""
    tasks_module = _lm_eval_tasks()
    with _quiet():
        manager = _manager(tasks_module, task, include_path)
        if task not in manager.all_tasks:
            close = difflib.get_close_matches(task, manager.all_tasks, n=5, cutoff=0.6)
            hint = f" (close: {', '.join(close)})" if close else ""
            where = f" in lm-eval's tasks or {include_path}" if include_path else " in lm-eval's tasks"
            raise RolevecError(
                f"unknown lm-eval task {task!r}{where}{hint}: pass a task name lm-eval lists "
                "(`lm_eval ls tasks`), or `include_path` with the folder of its YAML"
            )
        try:
            loaded = manager.load(task)
        except Exception as exc:  # lm-eval raises what its dataset and template code raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RolevecError(
                f"lm-eval could not load task {task!r} ({first}); check its YAML and that its dataset "
                "is reachable"
            ) from exc
    found: dict[str, Any] = dict(loaded["tasks"])
    return found


def _check_task(name: str, task: Any) -> None:
    """Refuse what a rolevec item cannot carry, naming the YAML field to change."""
    config = task.config
    output_type = getattr(config, "output_type", None) or getattr(task, "OUTPUT_TYPE", None)
    if output_type != "multiple_choice":
        raise RolevecError(
            f"lm-eval task {name} has output_type {output_type!r}: only multiple_choice tasks can be "
            "scored; pass a multiple-choice task"
        )
    shots = getattr(config, "num_fewshot", None)
    if shots:
        raise RolevecError(
            f"lm-eval task {name} sets num_fewshot: {shots}: few-shot prompts are not supported; set "
            "num_fewshot: 0 (or remove it) in its YAML"
        )
    if getattr(config, "gen_prefix", None):
        raise RolevecError(
            f"lm-eval task {name} sets gen_prefix: rolevec scores right after the assistant header; remove "
            "gen_prefix from its YAML"
        )
    if getattr(task, "multiple_input", 0):
        raise RolevecError(
            f"lm-eval task {name} puts its choices in the context (doc_to_text gives an index): such tasks "
            "are not supported; pass a task whose doc_to_choice lists the answers"
        )


def _docs(task: Any) -> tuple[str, Iterable[Any]]:
    """The split lm-eval evaluates (test docs if the task has them, else validation) and its documents."""
    if task.has_test_docs():
        return str(task.config.test_split), task.test_docs()
    if task.has_validation_docs():
        return str(task.config.validation_split), task.validation_docs()
    raise RolevecError(
        f"lm-eval task {task.config.task} has no test_split or validation_split: set one in its YAML"
    )


def _target_index(target: Any, choices: tuple[str, ...]) -> int:
    """lm-eval's gold: an index into the choices, or the text of one of them."""
    if isinstance(target, bool | list | tuple):
        raise _Bad(f"has target {target!r}: pass one index or the text of one choice")
    if isinstance(target, int):
        if 0 <= target < len(choices):
            return target
        raise _Bad(f"has target {target} outside its {len(choices)} choices (0-{len(choices) - 1})")
    if isinstance(target, str):
        if target in choices:
            return choices.index(target)
        raise _Bad(f"has target {target!r}, which is not one of its choices")
    raise _Bad(f"has target {target!r}: pass an index or the text of one choice")


def _item(task: Any, doc: Any, name: str, domain: str, index: int, delimiter: str) -> MCQItem:
    text = task.doc_to_text(doc)
    if not isinstance(text, str) or not text.strip():
        raise _Bad("has no question text (doc_to_text gave nothing)")
    raw = task.doc_to_choice(doc)
    if not isinstance(raw, list | tuple):
        raise _Bad(f"has choices {raw!r}, not a list (doc_to_choice)")
    choices = check_choices(list(raw))
    answer = ALL_LETTERS[_target_index(task.doc_to_target(doc), choices)]
    context = task.fewshot_context(doc=doc, num_fewshot=0)
    instruction = context if isinstance(context, str) else text
    return MCQItem(
        f"{PREFIX}{name}/{domain}/{index}", domain, text, choices, answer, domain, instruction, delimiter
    )


def load_lm_eval_task(
    task: str,
    include_path: str | Path | None = None,
    domains: Sequence[str] | None = None,
    *,
    skip_bad: bool = False,
    chat_template: bool = False,
) -> MCQSet:
    """A multiple-choice lm-eval task's documents as items, one domain per (sub)task, 0-shot.

    Reads the test split where the task has one, else validation (named in ``source``:
    ``lm-eval:TASK@SPLIT``). Raises for a task that is not multiple-choice, one asking for few-shot
    examples or a ``gen_prefix``, an unknown name (with close matches) and a missing lm-eval; a document
    whose target is not one of its choices is an error unless ``skip_bad`` (then counted in ``n_skipped``).

    Args:
        task: An lm-eval task, group or tag name (a group gives one domain per subtask).
        include_path: A folder of extra task YAML files, as lm-eval's ``--include_path``.
        domains: The subtasks to keep (default: all).
        skip_bad: Skip documents rolevec cannot score instead of raising.
        chat_template: Give each item the delimiter lm-eval uses with ``apply_chat_template=True`` (none)
            instead of the task's ``target_delimiter`` (default ``False``).

    Returns:
        The :class:`~rolevec.data.mcq.MCQSet` (``kind="lm-eval"``); score it with continuation scoring
        (:data:`SCORING`), or letter scoring where :func:`letter_scoring_valid` holds.

    Example:
        ```python
        mcq = load_lm_eval_task("my_task", include_path="tasks/")
        items = mcq.items["my_task"]
        print(mcq.source, len(items), items[0].choices, items[0].answer)
        ```
    """
    found = _load(task, include_path)
    names = list(found)
    if domains is not None:
        unknown = [d for d in domains if d not in found]
        if unknown:
            raise RolevecError(
                f"lm-eval task {task} has no subtask {unknown[0]!r} (it has {', '.join(names)}): pass "
                "`domains` from those"
            )
        names = [n for n in names if n in domains]
    items: dict[str, list[MCQItem]] = {}
    splits: list[str] = []
    bad = 0
    for name in names:
        lm_task = found[name]
        _check_task(name, lm_task)
        delimiter = "" if chat_template else str(lm_task.config.target_delimiter)
        split, docs = _docs(lm_task)
        splits.append(split)
        domain_items: list[MCQItem] = []
        with _quiet():
            for index, doc in enumerate(docs):
                try:
                    domain_items.append(_item(lm_task, doc, task, name, index, delimiter))
                except _Bad as exc:
                    if not skip_bad:
                        raise RolevecError(
                            f"lm-eval task {name} ({split} split) item {index} {exc}: fix the task or its "
                            "data, or pass `skip_bad=True` to count and skip such items"
                        ) from None
                    bad += 1
        if not domain_items:
            raise RolevecError(
                f"lm-eval task {name} has no usable documents in its {split} split: pass another task"
            )
        items[name] = domain_items
    unique = sorted(set(splits))
    return MCQSet(items, f"{PREFIX}{task}@{'+'.join(unique)}", bad, KIND)


def letter_scoring_valid(items: Iterable[MCQItem]) -> bool:
    """Whether letter scoring ranks these items as lm-eval does: every choice is its own answer letter."""
    return all(tuple(c.strip() for c in item.choices) == item.letters for item in items)
