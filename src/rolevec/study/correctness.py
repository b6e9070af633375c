"""The correctness AUROC of a role vector (:mod:`rolevec.analysis.correctness`) on a study run folder.

Reads what the run already holds: the role's vector (``vectors.safetensors``) at its chosen site
(``selection.json``), the role's own domain's test questions (``split.json``, reloaded from the source
``settings.json`` names, rendered with the run's prompt format) and whether each was answered correctly
under the baseline and under the role's addition at its chosen α (``records.jsonl``). Nothing is scored
again; the model runs only to read projections. It lives here, not in :mod:`rolevec.analysis`, because it
rebuilds the run's prompt format and ``add`` condition, which belong to :mod:`rolevec.evaluation`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..analysis.correctness import DEFAULT_RANDOM, DEFAULT_SEED, CorrectnessAUROC, correctness_auroc
from ..core.records import SETTINGS_NAME, read_records
from ..data.mcq import Split, load_mcq
from ..data.mcq_layouts import MCQSpec
from ..errors import RolevecError, path_problem
from ..evaluation.conditions import Condition
from ..evaluation.scoring import PromptFormat
from ..evaluation.selection import load_selection
from ..model.loading import ModelAdapter
from ..vectors.role_vectors import RoleVectors
from .stages import read_stored

#: The run files this analysis reads.
RUN_FILES = ("vectors.safetensors", "selection.json", "split.json", "records.jsonl", SETTINGS_NAME)


@dataclass(frozen=True)
class RunCorrectness:
    """Both readings of the correctness AUROC for one role of a run, on the same questions.

    Attributes:
        role: The role.
        domain: Its own domain, whose test questions were used.
        layer: The chosen site's layer (the vector's, and where the addition is made).
        position: The chosen site's post-instruction position (the vector's).
        alpha: The α of the ``add`` records used.
        unsteered: Baseline correctness, projections read from the unsteered model.
        steered: The addition's correctness, projections read with the addition applied.
    """

    role: str
    domain: str
    layer: int
    position: int
    alpha: float
    unsteered: CorrectnessAUROC
    steered: CorrectnessAUROC

    def to_json(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "domain": self.domain,
            "layer": self.layer,
            "position": self.position,
            "alpha": self.alpha,
            "unsteered": self.unsteered.to_json(),
            "steered": self.steered.to_json(),
        }


def _matches(record: Mapping[str, Any], keep: Mapping[str, Any]) -> bool:
    """Whether a test record's fields equal ``keep`` (α compared as a float)."""
    if record.get("split") != "test":
        return False
    for key, want in keep.items():
        got = record.get(key)
        if key == "alpha":
            if got is None or not math.isclose(float(got), want):
                return False
        elif got != want:
            return False
    return True


def correctness_auroc_from_run(
    run_dir: str | Path,
    adapter: ModelAdapter,
    role: str,
    *,
    alpha: float | None = None,
    source: str | Path | MCQSpec | Mapping[str, Any] | None = None,
    read_layer: int | None = None,
    n_random: int = DEFAULT_RANDOM,
    seed: int = DEFAULT_SEED,
    batch_size: int = 16,
    progress: bool = False,
) -> RunCorrectness:
    """Does the role vector's last-token projection predict correctness on the role's own test questions?

    Both readings use the questions that have a baseline and an ``add`` record, so they differ only in
    what is read and which correctness is predicted. Everything is checked before the model runs.

    Args:
        run_dir: A ``rolevec run`` folder (vectors, selection, split, records and settings).
        adapter: The model the run was made with.
        role: A role of ``selection.json``.
        alpha: The α of the ``add`` records to use (default: the chosen site's α).
        source: Where to reload the questions (default: the source ``settings.json`` names); pass the
            run's own (e.g. an :class:`rolevec.MCQSpec`) when its layout is not the default.
        read_layer: Read the residual at the input of this block (default: the site's layer).
        n_random: Random directions in the null (default 32).
        seed: Their seed (default 0).
        batch_size: Questions per forward.
        progress: Show progress bars.

    Returns:
        A :class:`RunCorrectness` with the ``unsteered`` and ``steered`` readings.

    Example:
        ```python
        from rolevec import correctness_auroc_from_run, load_model

        result = correctness_auroc_from_run("runs/quick", load_model(), "doctor")
        print(result.unsteered.line())
        print(result.steered.line())
        ```
    """
    root = Path(run_dir)
    for name in RUN_FILES:
        if not (root / name).is_file():
            raise RolevecError(f"{root / name} {path_problem(root / name)}: pass a `rolevec run` folder")
    settings = read_stored(root / SETTINGS_NAME)
    scoring = settings.get("scoring", "letter")
    if scoring != "letter":
        raise RolevecError(
            f"{root} was scored by {scoring}: the answer is read at the last prompt token only under letter "
            "scoring"
        )
    fmt = PromptFormat(**settings["prompt"]) if isinstance(settings.get("prompt"), dict) else PromptFormat()
    entry = load_selection(root / "selection.json", adapter)["roles"].get(role)
    if not isinstance(entry, dict):
        raise RolevecError(f"{root / 'selection.json'} has no site for role {role!r}: pass one of its roles")
    layer, position, domain = int(entry["layer"]), int(entry["position"]), str(entry["domain"])
    a = float(entry["alpha"] if alpha is None else alpha)
    vectors = RoleVectors.load(root / "vectors.safetensors")
    vectors.check_compatible(adapter)
    add = Condition.make("add", role=role, layer=layer, position=position, alpha=a)
    steering = add.steering(vectors)
    assert steering is not None
    wanted = {"condition": "add", "role": role, "layer": layer, "position": position, "alpha": a}
    base: dict[str, bool] = {}
    added: dict[str, bool] = {}
    for record in read_records(root / "records.jsonl"):  # one pass; nothing but two qid maps is kept
        if _matches(record, {"condition": "baseline", "domain": domain}):
            base[str(record["qid"])] = bool(record["correct"])
        elif _matches(record, wanted):
            added[str(record["qid"])] = bool(record["correct"])
    if not base or not added:
        missing = "baseline" if not base else f"add (α={a:g}, layer {layer}, position {position})"
        raise RolevecError(
            f"{root / 'records.jsonl'} has no {missing} test records for {role!r} on {domain}: run the test "
            "stage first"
        )
    split = Split.load(root / "split.json")
    mcq = load_mcq(source if source is not None else settings.get("mcq") or split.source, [domain])
    by_qid = {it.qid: it for it in mcq.items[domain]}
    qids = [q for q in split.qids(domain, "test") if q in base and q in added]
    lost = [q for q in qids if q not in by_qid]
    if lost:
        raise RolevecError(
            f"{len(lost)} recorded question(s) (e.g. {lost[0]}) are not in {mcq.source}: pass the run's "
            "question `source`"
        )
    if not qids:
        raise RolevecError(f"no test question of {domain} has both a baseline and an add record")
    items = [by_qid[q] for q in qids]
    common: dict[str, Any] = {
        "prompt_format": fmt,
        "read_layer": read_layer,
        "n_random": n_random,
        "seed": seed,
        "batch_size": batch_size,
        "progress": progress,
    }
    vector = vectors.vector(role, layer, position)
    unsteered = correctness_auroc(adapter, items, [base[q] for q in qids], vector, layer, **common)
    steered = correctness_auroc(
        adapter, items, [added[q] for q in qids], vector, layer, steering=steering, **common
    )
    return RunCorrectness(role, domain, layer, position, a, unsteered, steered)
