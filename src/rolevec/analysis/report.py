"""The report of one run: report.html (self-contained), report.md, tables/*.csv and figures/*.png.

It reads only the run folder's files, never the model, so it can be rebuilt at any time. Sample sizes and
95% intervals sit next to every accuracy, and a banner warns when cells are small, so a difference that
is noise never reads as a finding. Optional inputs that are absent (sweep, vectors, interpretation,
diagnostics) turn their section into a note saying the stage was not run.

Any benchmark fits: the domains are those of the records, each accuracy sits next to its chance level
(1/number of choices, averaged over the questions), continuation-scored runs show acc_norm too, and the
header says which question source and scoring rule made the records (from settings.json).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.files import atomic_write, read_text
from ..core.records import read_records
from ..errors import RolevecError, path_problem
from ..vectors.role_vectors import RoleVectors
from . import figures
from .geometry import Geometry, role_geometry
from .stats import RESAMPLES, holm
from .tables import (
    DIAGNOSTICS,
    SIGNIFICANCE,
    SMALL_N,
    Analysis,
    Cell,
    DiagnosticRow,
    Pooled,
    Record,
    SweepPanel,
    adjust,
    analyse,
    chance_levels,
    choice_counts,
    condition_holm,
    diagnostic_rows,
    load_records,
    main_label,
    pool,
    role_domains,
    star,
    sweep_panels,
)


# --- tables -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    """A table column; ``kind`` says how to print it: str, int, acc, ci, rel, relci, p, float, bool."""

    name: str
    kind: str = "str"


@dataclass
class Table:
    name: str  # file stem of the CSV
    title: str
    columns: list[Column]
    rows: list[list[Any]] = field(default_factory=list)
    note: str = ""


def _nan(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def fmt(value: Any, kind: str) -> str:
    """Human-readable cell text."""
    if kind in ("ci", "relci"):
        low, high = value if value is not None else (math.nan, math.nan)
        if _nan(low) or _nan(high):
            return "n/a"
        if kind == "ci":
            return f"[{100 * low:.1f}, {100 * high:.1f}]"
        return f"[{low:+.1f}, {high:+.1f}]"
    if _nan(value):
        return "n/a"
    if kind == "acc":
        return f"{100 * value:.1f}%"
    if kind == "rel":
        return f"{value:+.1f}%"
    if kind == "p":
        return "<0.001" if value < 0.001 else f"{value:.3f}"
    if kind == "float":
        return f"{value:.3g}"
    if kind == "bool":
        return "yes" if value else "no"
    return str(value)


def _csv_cells(value: Any, kind: str) -> list[str]:
    if kind in ("ci", "relci"):
        low, high = value if value is not None else (math.nan, math.nan)
        return [_csv_cells(low, "float")[0], _csv_cells(high, "float")[0]]
    if _nan(value):
        return [""]
    if isinstance(value, float):
        return [repr(value)]
    if isinstance(value, bool):
        return ["true" if value else "false"]
    return [str(value)]


def table_csv(table: Table) -> str:
    import csv

    header: list[str] = []
    for col in table.columns:
        if col.kind in ("ci", "relci"):
            header += [f"{col.name} low", f"{col.name} high"]
        else:
            header.append(col.name)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in table.rows:
        cells: list[str] = []
        for value, col in zip(row, table.columns, strict=True):
            cells += _csv_cells(value, col.kind)
        writer.writerow(cells)
    return buf.getvalue()


_UNPRINTABLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")


def printable(text: str) -> str:
    """Control characters (which generated text can hold) shown as escapes: XML and HTML forbid them."""
    return _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _md_escape(text: str) -> str:
    """Cell text that a Markdown renderer shows literally (no inline HTML, no column breaks)."""
    text = html.escape(printable(text), quote=False)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def table_markdown(table: Table) -> str:
    lines = [f"**{_md_escape(table.title)}**", ""]
    if not table.rows:
        return "\n".join([*lines, "_(no rows)_", ""])
    lines.append("| " + " | ".join(_md_escape(c.name) for c in table.columns) + " |")
    aligns = ["---" if c.kind in ("str", "bool") else "---:" for c in table.columns]
    lines.append("| " + " | ".join(aligns) + " |")
    for row in table.rows:
        cells = [_md_escape(fmt(v, c.kind)) for v, c in zip(row, table.columns, strict=True)]
        lines.append("| " + " | ".join(cells) + " |")
    if table.note:
        lines += ["", _md_escape(table.note)]
    return "\n".join([*lines, ""])


def _e(text: Any) -> str:
    return html.escape(printable(str(text)), quote=True)


def table_html(table: Table, *, collapsed: bool = False) -> str:
    head = "".join(f"<th>{_e(c.name)}</th>" for c in table.columns)
    body = []
    for row in table.rows:
        cells = []
        for value, col in zip(row, table.columns, strict=True):
            cls = ' class="num"' if col.kind not in ("str", "bool") else ""
            cells.append(f"<td{cls}>{_e(fmt(value, col.kind))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    table_text = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    inner = f'<div class="scroll">{table_text}</div>' if table.rows else "<p><em>(no rows)</em></p>"
    note = f'<p class="note">{_e(table.note)}</p>' if table.note else ""
    csv_link = f'<p class="note">CSV: <code>tables/{_e(table.name)}.csv</code></p>'
    if collapsed:
        return f"<details><summary>{_e(table.title)}</summary>{inner}{note}{csv_link}</details>"
    return f"<h3>{_e(table.title)}</h3>{inner}{note}{csv_link}"


# --- run inputs ---------------------------------------------------------------------------------------
@dataclass
class Input:
    """An optional input: its content, or why there is none."""

    value: Any = None
    missing: str = ""


@dataclass
class RunData:
    run_dir: Path
    manifest: dict[str, Any]
    selection: dict[str, Any]
    analysis: Analysis
    sweep: Input
    vectors: Input
    interpret: Input
    settings: dict[str, Any] = field(default_factory=dict)
    #: Each role's own domain as the report used it (map, selection, sweep, then the paper's table).
    role_map: dict[str, str] = field(default_factory=dict)
    #: Domain -> chance level on the validation split (the test split's where a domain has no val rows).
    val_chance: dict[str, float] = field(default_factory=dict)
    #: Number of choices -> how many distinct questions had it.
    choices: dict[int, int] = field(default_factory=dict)
    #: The scoring rules the records name; empty for records older than the choice (letter scored).
    record_scoring: tuple[str, ...] = ()
    #: diagnostics.json (absent in runs made before the diagnostics step).
    diagnostics: Input = field(default_factory=lambda: Input(missing="no diagnostics.json"))


def _read_json(path: Path) -> Input:
    if not path.is_file():
        return Input(missing=f"no {path.name}")
    try:
        data = json.loads(read_text(path, what=path.name))
    except RolevecError as exc:  # undecodable bytes or no permission: said once, the report goes on
        return Input(missing=str(exc))
    except ValueError as exc:
        return Input(missing=f"{path.name} is not readable JSON ({exc})")
    if not isinstance(data, dict):
        return Input(missing=f"{path.name} is not a JSON object")
    return Input(data)


def _settings_map(settings: Mapping[str, Any]) -> dict[str, str]:
    """A role -> domain map pinned in settings.json (key ``role_domains``), when there is a usable one."""
    pinned = settings.get("role_domains")
    if not isinstance(pinned, Mapping):
        return {}
    return {str(role): str(domain) for role, domain in pinned.items() if isinstance(domain, str) and domain}


def load_run(run_dir: str | Path, *, role_map: Mapping[str, str] | None = None) -> RunData:
    """Everything the report shows, from the run folder only; records.jsonl is the one required file.

    ``role_map`` (role -> domain, :func:`rolevec.data.sources.load_role_domains`) names the own domain of
    roles outside the paper's table; without it the selection, the sweep and a map pinned in
    settings.json decide, then the paper's table.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise RolevecError(
            f"run folder {root} {path_problem(root, folder=True)}: pass the run folder of `rolevec run`"
        )
    records = load_records(root)
    optional = {
        name: _read_json(root / name) for name in ("manifest.json", "selection.json", "settings.json")
    }
    for name, got in optional.items():
        if got.missing and got.missing != f"no {name}":  # there, but damaged: say so, report without it
            warnings.warn(f"{got.missing}; the report leaves out what it would have given", stacklevel=2)
    manifest = optional["manifest.json"].value or {}
    selection = optional["selection.json"].value or {}
    settings = optional["settings.json"].value or {}
    sweep = Input(missing="no sweep.jsonl (the validation sweep was not run)")
    sweep_path = root / "sweep.jsonl"
    if sweep_path.is_file():
        sweep = Input([row for row in read_records(sweep_path) if isinstance(row, dict)])
    explicit = {**_settings_map(settings), **(role_map or {})}
    domain_of = role_domains(selection, mapping=explicit, sweep=sweep.value)
    test_chance = chance_levels(records, "test")
    val_chance = {**test_chance, **chance_levels(records, "val")}
    vectors = Input(missing="no vectors.safetensors")
    if (root / "vectors.safetensors").is_file():
        try:
            vectors = Input(RoleVectors.load(root / "vectors.safetensors"))
        except RolevecError as exc:
            vectors = Input(missing=str(exc))
    interpret = _read_json(root / "interpret.json")
    diagnostics = _read_json(root / "diagnostics.json")
    if diagnostics.missing == "no diagnostics.json":
        diagnostics.missing = "no diagnostics.json (the run predates the diagnostics step)"
    if interpret.missing == "no interpret.json":
        interpret.missing = "no interpret.json (interpretation was not run)"
    elif interpret.value is not None and not isinstance(interpret.value.get("roles"), dict):
        interpret = Input(missing="interpret.json has no 'roles' entry")
    return RunData(
        run_dir=root,
        manifest=manifest,
        selection=selection,
        analysis=analyse(records, selection=selection, role_map=domain_of),
        sweep=sweep,
        vectors=vectors,
        interpret=interpret,
        settings=settings,
        role_map=domain_of,
        val_chance=val_chance,
        choices=choice_counts(records),
        record_scoring=_record_scoring(records),
        diagnostics=diagnostics,
    )


def _record_scoring(records: Sequence[Record]) -> tuple[str, ...]:
    return tuple(sorted({r.scoring for r in records if r.scoring}))


# --- tables of a run ----------------------------------------------------------------------------------
def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", label.replace("α=", "a")).strip("_")


def _position_tokens(data: RunData) -> dict[int, str]:
    vectors = data.vectors.value
    if isinstance(vectors, RoleVectors):
        return dict(zip(vectors.positions, vectors.position_tokens, strict=True))
    return {}


CHANCE_NOTE = "chance = the mean of 1/number of choices over the domain's questions (guessing)."
NORM_NOTE = "acc_norm = continuation scoring's choice by log-likelihood per character (lm-eval's acc_norm)."


def baseline_table(a: Analysis) -> Table:
    columns = [Column("domain"), Column("n", "int"), Column("accuracy", "acc"), Column("95% CI (%)", "ci")]
    if a.continuation:
        columns.append(Column("acc_norm", "acc"))
    columns.append(Column("chance", "acc"))
    t = Table(
        "baseline",
        "Baseline accuracy per domain (test split)",
        columns,
        note=CHANCE_NOTE + (" " + NORM_NOTE if a.continuation else ""),
    )
    for b in a.baseline:
        row: list[Any] = [b.domain, b.n, b.accuracy, b.ci]
        if a.continuation:
            row.append(b.accuracy_norm)
        t.rows.append([*row, b.chance])
    return t


def selection_table(data: RunData) -> Table:
    tokens = _position_tokens(data)
    t = Table(
        "selection",
        "Chosen (layer, position, α) per role, on the validation split",
        [
            Column("role"),
            Column("domain"),
            Column("layer", "int"),
            Column("position", "int"),
            Column("position token"),
            Column("α", "float"),
            Column("val accuracy", "acc"),
            Column("val baseline", "acc"),
            Column("val ablate", "acc"),
            Column("val chance", "acc"),
            Column("criterion met", "bool"),
            Column("candidates passing", "int"),
        ],
        note="Layers are the input of decoder block L; positions count from the end of the prompt. "
        "val chance = the mean of 1/number of choices over the domain's validation questions.",
    )
    for role, info in (data.selection.get("roles") or {}).items():
        position = info.get("position")
        t.rows.append(
            [
                role,
                info.get("domain"),
                info.get("layer"),
                position,
                repr(tokens[position]) if position in tokens else None,
                info.get("alpha"),
                info.get("val_accuracy"),
                info.get("val_baseline"),
                info.get("val_ablate_accuracy"),
                data.val_chance.get(str(info.get("domain") or data.role_map.get(role))),
                info.get("criterion_met"),
                info.get("n_candidates_passing"),
            ]
        )
    return t


def summary_table(a: Analysis) -> Table:
    norm = [Column("acc_norm", "acc"), Column("baseline acc_norm", "acc")] if a.continuation else []
    t = Table(
        "summary",
        "In-domain vs out-of-domain relative change of accuracy (test split, paired with the baseline)",
        [
            Column("role"),
            Column("domain"),
            Column("condition"),
            Column("in-domain n", "int"),
            Column("accuracy", "acc"),
            Column("95% CI (%)", "ci"),
            Column("baseline", "acc"),
            *norm,
            Column("chance", "acc"),
            Column("rel. change", "rel"),
            Column("rel. 95% CI", "relci"),
            Column("rel. 95% CI (bootstrap)", "relci"),
            Column("McNemar p", "p"),
            Column("p Holm", "p"),
            Column("p BH", "p"),
            Column("out-of-domain mean rel.", "rel"),
            Column("out-of-domain domains", "int"),
            Column("out-of-domain pooled n", "int"),
            Column("pooled rel.", "rel"),
            Column("pooled rel. 95% CI (bootstrap)", "relci"),
            Column("pooled p", "p"),
            Column("pooled p Holm", "p"),
            Column("pooled p BH", "p"),
        ],
    )
    pvalues: list[float | None] = []
    for s in a.summaries:
        pvalues.append(s.in_domain.p_value if s.in_domain else None)
        pvalues.append(s.ood_pooled.p_value if s.ood_pooled.n else None)
    adjusted = adjust(pvalues)
    tests = sum(p is not None for p in pvalues)
    t.note = (
        f"Adjusted p (Holm, Benjamini–Hochberg): family: the {tests:,} McNemar tests of this table (each "
        "row's in-domain and pooled out-of-domain test). rel. change = 100·(acc − acc_base)/acc_base on "
        "the same questions; rel. 95% CI = Wald interval of the paired difference over acc_base; "
        f"bootstrap = paired bootstrap ({RESAMPLES} resamples of the questions, condition and baseline "
        "together, seeded); out-of-domain mean = unweighted mean over the other domains; pooled = all "
        "out-of-domain questions of the role together (one role, so no question counts twice). "
        + CHANCE_NOTE
        + (" " + NORM_NOTE if a.continuation else "")
    )
    for index, s in enumerate(a.summaries):
        inside_adj, pooled_adj = adjusted[2 * index], adjusted[2 * index + 1]
        inside = s.in_domain
        inorm = s.in_domain_norm
        norm_values = [inorm.accuracy, inorm.base_accuracy] if inorm else [None, None]
        t.rows.append(
            [
                s.role,
                s.role_domain,
                s.condition.label,
                inside.n if inside else None,
                inside.accuracy if inside else None,
                inside.ci if inside else None,
                inside.base_accuracy if inside else None,
                *(norm_values if a.continuation else []),
                a.chance.get(str(s.role_domain)),
                inside.rel_change if inside else None,
                inside.rel_ci if inside else None,
                inside.rel_ci_bootstrap if inside else None,
                inside.p_value if inside else None,
                inside_adj.holm,
                inside_adj.bh,
                s.ood_mean_rel,
                s.ood_domains,
                s.ood_pooled.n,
                s.ood_pooled.rel_change,
                s.ood_pooled.rel_ci_bootstrap if s.ood_pooled.n else None,
                s.ood_pooled.p_value if s.ood_pooled.n else None,
                pooled_adj.holm,
                pooled_adj.bh,
            ]
        )
    return t


def by_domain_table(a: Analysis) -> Table:
    t = Table(
        "by_domain",
        "Mean relative change over the roles of each domain",
        [
            Column("domain"),
            Column("condition"),
            Column("roles", "int"),
            Column("in-domain mean rel.", "rel"),
            Column("out-of-domain mean rel.", "rel"),
        ],
        note="Unweighted means of the per-role values in the summary table.",
    )
    groups: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for s in a.summaries:
        if s.role_domain is None:
            continue
        inside = s.in_domain.rel_change if s.in_domain else math.nan
        groups[(s.role_domain, s.condition.label)].append((inside, s.ood_mean_rel))
    for domain in a.domains:
        for label in a.labels:
            values = groups.get((domain, label))
            if not values:
                continue
            ins = [v for v, _ in values if not math.isnan(v)]
            outs = [v for _, v in values if not math.isnan(v)]
            t.rows.append(
                [
                    domain,
                    label,
                    len(values),
                    sum(ins) / len(ins) if ins else math.nan,
                    sum(outs) / len(outs) if outs else math.nan,
                ]
            )
    return t


def relative_table(a: Analysis, label: str) -> Table:
    """Role × domain relative change for one condition (what the heatmap shows)."""
    cols = [Column("role"), Column("domain")]
    cols += [Column(f"{d} ({a.column_n(label, d)})") for d in a.domains]
    adjusted = condition_holm(a, label)
    t = Table(
        f"rel_{slug(label)}",
        f"Relative change (%) of accuracy vs baseline: {label}",
        cols,
        note=f"Cells: relative change in %; * Holm-adjusted McNemar p < {SIGNIFICANCE:g} (family: the "
        f"{len(adjusted):,} role × domain cells of this table); [brackets] = the role's own domain. "
        "CIs, n, raw and adjusted p of every cell are in the full cell table.",
    )
    for role in a.roles:
        row: list[Any] = [role, a.role_domain.get(role)]
        present = False
        for d in a.domains:
            c = a.cell(role, label, d)
            if c is None:
                row.append(None)
                continue
            present = True
            text = fmt(c.stats.rel_change, "rel") + star(adjusted.get((role, d), 1.0))
            row.append(f"[{text}]" if c.in_domain else text)
        if present:
            t.rows.append(row)
    return t


def relative_csv_table(a: Analysis, label: str) -> Table:
    """The same matrix with plain numbers, for the CSV."""
    t = Table(
        f"rel_{slug(label)}",
        f"Relative change (%) of accuracy vs baseline: {label}",
        [Column("role"), Column("domain")] + [Column(d, "float") for d in a.domains],
    )
    for role in a.roles:
        cells = [a.cell(role, label, d) for d in a.domains]
        if any(c is not None for c in cells):
            t.rows.append(
                [role, a.role_domain.get(role)] + [c.stats.rel_change if c else None for c in cells]
            )
    return t


def cells_table(a: Analysis) -> Table:
    t = Table(
        "cells",
        "Every role × condition × domain cell (test split)",
        [
            Column("role"),
            Column("role domain"),
            Column("condition"),
            Column("layer", "int"),
            Column("position", "int"),
            Column("domain"),
            Column("in-domain", "bool"),
            Column("n", "int"),
            Column("accuracy", "acc"),
            Column("95% CI (%)", "ci"),
            Column("baseline", "acc"),
            Column("baseline 95% CI (%)", "ci"),
            *([Column("acc_norm", "acc"), Column("baseline acc_norm", "acc")] if a.continuation else []),
            Column("chance", "acc"),
            Column("rel. change", "rel"),
            Column("rel. 95% CI", "relci"),
            Column("rel. 95% CI (bootstrap)", "relci"),
            Column("gained", "int"),
            Column("lost", "int"),
            Column("McNemar p", "p"),
            Column("p Holm", "p"),
            Column("p BH", "p"),
        ],
        note=f"Adjusted p (Holm, Benjamini–Hochberg): {cells_family(a)}. gained = baseline wrong and "
        "condition right; lost = the reverse (McNemar's discordant pairs); bootstrap = paired bootstrap "
        f"of the relative change ({RESAMPLES} resamples of the questions, seeded). "
        + CHANCE_NOTE
        + (" " + NORM_NOTE if a.continuation else ""),
    )
    adjusted = adjust([c.stats.p_value for c in a.cells])
    for c, adj in zip(a.cells, adjusted, strict=True):
        s = c.stats
        key = c.condition
        norm = [c.norm.accuracy, c.norm.base_accuracy] if c.norm else [None, None]
        t.rows.append(
            [
                c.role,
                c.role_domain,
                key.label,
                key.layer if key.layer >= 0 else None,
                key.position if key.kind in ("add", "ablate", "random") else None,
                c.domain,
                c.in_domain,
                s.n,
                s.accuracy,
                s.ci,
                s.base_accuracy,
                s.base_ci,
                *(norm if a.continuation else []),
                a.chance.get(c.domain),
                s.rel_change,
                s.rel_ci,
                s.rel_ci_bootstrap,
                s.gained,
                s.lost,
                s.p_value,
                adj.holm,
                adj.bh,
            ]
        )
    return t


def cells_family(a: Analysis) -> str:
    """The family of the cell table's adjusted p-values, in words (its caption and the banner say it)."""
    return f"family: the {len(a.cells):,} role × domain × condition cells of this table"


def significance_counts(a: Analysis) -> str:
    """How many cells pass p < 0.05 raw, after Holm and after BH, against what chance alone gives."""
    raw = [c.stats.p_value for c in a.cells]
    adjusted = adjust(raw)
    level = SIGNIFICANCE
    holm_k = sum(x.holm is not None and x.holm < level for x in adjusted)
    bh_k = sum(x.bh is not None and x.bh < level for x in adjusted)
    raw_k = sum(p < level for p in raw)
    return (
        f"Significant cells: {holm_k} of {len(raw):,} after Holm and {bh_k} after Benjamini–Hochberg "
        f"(adjusted p < {level:g}; {cells_family(a).replace('of this table', 'of the cell table')}); "
        f"unadjusted, {raw_k} have McNemar p < {level:g}, where chance alone gives about "
        f"{level * len(raw):.0f}."
    )


# --- the first screen: main findings in words ---------------------------------------------------------
@dataclass(frozen=True)
class Findings:
    """The three summary lines of the first screen and the pooled tests behind them."""

    lines: list[str]
    note: str
    tests: dict[str, Pooled]  # name -> pooled comparison, in the order Holm adjusts them
    holm: dict[str, float]


def _known(c: Cell) -> bool:
    return c.role_domain is not None


def finding_tests(a: Analysis) -> dict[str, Pooled]:
    """The pooled comparisons the summary lines state, each over all roles (questions as clusters):
    the main addition and ablation in- and out-of-domain, addition vs persona in-domain, random overall."""
    tests: dict[str, Pooled] = {}
    for kind in ("add", "ablate"):
        label = main_label(a, kind)
        if label is None:
            continue
        own = [c for c in a.cells if c.condition.label == label and _known(c)]
        tests[f"{kind} in-domain"] = pool((c, None) for c in own if c.in_domain)
        tests[f"{kind} out-of-domain"] = pool((c, None) for c in own if not c.in_domain)
    add, persona = main_label(a, "add"), main_label(a, "persona")
    if add is not None and persona is not None:
        pairs = []
        for c in a.cells:
            if c.condition.label == add and c.in_domain:
                other = a.cell(c.role, persona, c.domain)
                if other is not None:
                    pairs.append((c, other))
        tests["add vs persona"] = pool(pairs)
        tests["persona in-domain"] = pool((other, None) for _, other in pairs)
        tests["add in-domain (persona roles)"] = pool((c, None) for c, _ in pairs)
    random = main_label(a, "random")
    if random is not None:
        tests["random all domains"] = pool((c, None) for c in a.cells if c.condition.label == random)
    return {name: t for name, t in tests.items() if t.n}


#: The tests whose p-values the summary lines state (the others only give a relative change).
STATED = (
    "add in-domain",
    "add out-of-domain",
    "ablate in-domain",
    "ablate out-of-domain",
    "add vs persona",
    "random all domains",
)


def _rel_text(t: Pooled) -> str:
    return f"{fmt(t.rel_change, 'rel')} (95% CI {fmt(t.ci, 'relci')})"


def _p_words(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"= {p:.3f}"


def _test_text(t: Pooled, p: float) -> str:
    roles = f"{t.roles} role" + ("" if t.roles == 1 else "s")
    return f"{_rel_text(t)}, n = {t.n:,} pairs on {t.questions:,} questions, {roles}, Holm p {_p_words(p)}"


def findings(a: Analysis) -> Findings:
    """The main findings in three lines, from the same cells as the tables; p-values Holm-adjusted over
    the pooled tests these lines state."""
    tests = finding_tests(a)
    stated = [name for name in STATED if name in tests]
    adjusted = dict(zip(stated, holm([tests[n].p_value for n in stated]), strict=True))
    padj = {n: p for n, p in adjusted.items() if p is not None}
    lines = []
    parts = []
    for kind in ("add", "ablate"):
        inside, outside = tests.get(f"{kind} in-domain"), tests.get(f"{kind} out-of-domain")
        label = main_label(a, kind)
        if inside is None and outside is None:
            continue
        words = [f"{label}:"]
        if inside is not None:
            words.append(f"{_test_text(inside, padj[f'{kind} in-domain'])} in the roles' own domains")
        if outside is not None:
            sep = "vs " if inside is not None else ""
            words.append(f"{sep}{_test_text(outside, padj[f'{kind} out-of-domain'])} in the other domains")
        parts.append(" ".join(words))
    lines.append(
        "In-domain vs out-of-domain: "
        + ("; ".join(parts) if parts else "no addition or ablation cells in this run")
        + "."
    )
    versus = tests.get("add vs persona")
    if versus is not None:
        add, persona = main_label(a, "add"), main_label(a, "persona")
        lines.append(
            f"Persona vs vector (own domains): the {persona} prompt changes accuracy by "
            f"{_rel_text(tests['persona in-domain'])} and {add} by "
            f"{_rel_text(tests['add in-domain (persona roles)'])} against the baseline; {add} against the "
            f"{persona} prompt: {_test_text(versus, padj['add vs persona'])}."
        )
    else:
        lines.append("Persona vs vector: the run has no persona and addition cells on the same questions.")
    random = tests.get("random all domains")
    if random is not None:
        lines.append(
            f"Random control: {main_label(a, 'random')} changes accuracy by "
            f"{_test_text(random, padj['random all domains'])} over all domains."
        )
    else:
        lines.append("Random control: the run has no random-direction cells.")
    note = (
        f"Each line pools the roles' pairs with the baseline; roles answering the same questions make "
        f"their pairs dependent, so each question is one cluster: the 95% CI is a cluster bootstrap "
        f"({RESAMPLES} resamples of question ids, the same resample for every role's pairs, seeded) and p "
        f"is the clustered McNemar test, Holm-adjusted (family: the {len(stated)} pooled tests of these "
        "lines)."
    )
    return Findings(lines, note, tests, padj)


def persona_vs_vector_table(a: Analysis) -> Table:
    labels = list(a.labels)
    t = Table(
        "persona_vs_vector",
        "In-domain relative change: persona prompt vs role vector",
        [Column("role"), Column("domain")] + [Column(label, "rel") for label in labels],
        note="Each value is paired with the baseline on the role's own domain; see the summary for n and p.",
    )
    for role in a.roles:
        row: list[Any] = [role, a.role_domain.get(role)]
        for label in labels:
            s = a.summary(role, label)
            row.append(s.in_domain.rel_change if s and s.in_domain else None)
        t.rows.append(row)
    return t


def sweep_table(panels: Sequence[SweepPanel]) -> Table:
    t = Table(
        "sweep_curves",
        "Validation sweep: accuracy per layer (what the sweep figure shows)",
        [
            Column("role"),
            Column("domain"),
            Column("curve"),
            Column("layer", "int"),
            Column("accuracy", "acc"),
            Column("baseline", "acc"),
            Column("chance", "acc"),
            Column("n", "int"),
        ],
        note=CHANCE_NOTE,
    )
    for p in panels:
        for curve in p.curves:
            for layer, acc in zip(curve.layers, curve.accuracy, strict=True):
                t.rows.append([p.role, p.domain, curve.label, layer, acc, p.baseline, p.chance, p.n])
    return t


# --- interpretation tables ----------------------------------------------------------------------------
def _tokens(entries: Sequence[Mapping[str, Any]]) -> str:
    return " ".join(repr(str(e.get("token", ""))) for e in entries)


def _verdict(judge: Any, source: str) -> str | None:
    if not isinstance(judge, Mapping) or not isinstance(judge.get(source), Mapping):
        return None
    related = judge[source].get("related")
    return "related" if related is True else "unrelated" if related is False else "unclear"


def patchscope_table(interp: Mapping[str, Any]) -> Table:
    t = Table(
        "patchscope",
        f"Patch-scoping: answers to {interp.get('prompt', '?')!r} with α={interp.get('alpha')}·d added "
        f"({interp.get('where')}) and without",
        [
            Column("role"),
            Column("domain"),
            Column("layer", "int"),
            Column("position", "int"),
            Column("‖d‖", "float"),
            Column("steered answer"),
            Column("unsteered answer"),
            Column("judge"),
        ],
    )
    for role, e in interp["roles"].items():
        if "skipped" in e:
            t.rows.append([role, e.get("domain"), None, None, None, f"(skipped: {e['skipped']})", "", None])
            continue
        scope = e.get("patchscope") or {}
        t.rows.append(
            [
                role,
                e.get("domain"),
                e.get("layer"),
                e.get("position"),
                e.get("vector_norm"),
                scope.get("steered", ""),
                scope.get("unsteered", ""),
                _verdict(e.get("judge"), "patchscope"),
            ]
        )
    return t


def logit_lens_table(interp: Mapping[str, Any]) -> Table:
    t = Table(
        "logit_lens",
        f"Logit lens: top and bottom {interp.get('top_k')} tokens of each direction",
        [Column("role"), Column("variant"), Column("top tokens"), Column("bottom tokens"), Column("judge")],
        note="normed = through the final norm and the unembedding; raw = W_U·d.",
    )
    for role, e in interp["roles"].items():
        lens = e.get("logit_lens") or {}
        for variant in ("normed", "raw"):
            if variant in lens:
                judged = _verdict(e.get("judge"), "logit_lens") if variant == "normed" else None
                t.rows.append(
                    [role, variant, _tokens(lens[variant]["top"]), _tokens(lens[variant]["bottom"]), judged]
                )
    return t


def improving_roles(data: RunData) -> dict[str, bool]:
    """Whether each role's selected addition improves its own domain on the test split (rel. change > 0)."""
    return {role: change > 0 for role, change in chosen_effects(data).items()}


def chosen_effects(data: RunData) -> dict[str, float]:
    """Each role's in-domain relative change (test split, %) under its selected addition."""
    out: dict[str, float] = {}
    chosen = data.selection.get("roles") or {}
    for role in data.analysis.roles:
        alpha = (chosen.get(role) or {}).get("alpha")
        candidates = [
            s
            for s in data.analysis.summaries
            if s.role == role
            and s.condition.kind == "add"
            and s.in_domain is not None
            and (alpha is None or math.isclose(s.condition.alpha, float(alpha)))
        ]
        if candidates:
            s = candidates[-1]
            assert s.in_domain is not None
            out[role] = s.in_domain.rel_change
    return out


def diagnostics_table(rows: Sequence[DiagnosticRow], effects: Mapping[str, float]) -> Table:
    """Per role: the diagnostics at its chosen site, each beside its random-direction threshold."""
    columns = [Column("role"), Column("layer", "int"), Column("position", "int")]
    for name in DIAGNOSTICS:
        columns += [
            Column(name, "float"),
            Column(f"{name} random 95%", "float"),
            Column(f"{name} shuffled 95%", "float"),
        ]
    columns += [
        Column("split-half cosine", "float"),
        Column("flagged"),
        Column("in-domain rel. change", "rel"),
    ]
    t = Table(
        "diagnostics",
        "Which vectors to trust: diagnostics at each role's chosen site",
        columns,
        note="consistency = mean cosine of each role prompt's difference from the base mean with the "
        "vector; separation = cross-fitted AUROC of role vs base prompts on the vector (0.5 = none); "
        "stability = mean cosine between bootstrap vectors. 'random 95%' = the 95th percentile of the same "
        "statistic over random directions of the vector's norm; 'shuffled 95%' = the same over label "
        "shuffles (role and base prompts pooled and dealt again at random); flagged = what the vector does "
        "not beat both of. "
        "in-domain rel. change = the chosen addition on the test split.",
    )
    for r in rows:
        row: list[Any] = [r.role, r.layer, r.position]
        for name in DIAGNOSTICS:
            row += [r.values[name], r.thresholds[name], r.shuffle_thresholds.get(name, math.nan)]
        row += [r.split_half, ", ".join(r.flagged) or "no", effects.get(r.role)]
        t.rows.append(row)
    return t


def judge_table(data: RunData) -> Table | None:
    """The paper's Table 4 statistic: the share of improving directions the judge calls role-related."""
    interp = data.interpret.value
    if not interp or not interp.get("judge"):
        return None
    improving = improving_roles(data)
    t = Table(
        "judge",
        "LLM judge: share of directions judged related to their role",
        [
            Column("source"),
            Column("improving directions judged", "int"),
            Column("related", "int"),
            Column("share", "acc"),
            Column("all directions judged", "int"),
            Column("related (all)", "int"),
            Column("share (all)", "acc"),
        ],
        note="Improving = the selected addition raises in-domain test accuracy (rel. change > 0). "
        "Unclear answers are left out of the shares.",
    )
    for source in ("patchscope", "logit_lens"):
        verdicts = {
            role: e["judge"][source].get("related")
            for role, e in interp["roles"].items()
            if isinstance(e.get("judge"), Mapping) and isinstance(e["judge"].get(source), Mapping)
        }
        judged_all = [v for v in verdicts.values() if v is not None]
        judged_imp = [v for r, v in verdicts.items() if v is not None and improving.get(r)]
        t.rows.append(
            [
                source,
                len(judged_imp),
                sum(judged_imp),
                sum(judged_imp) / len(judged_imp) if judged_imp else None,
                len(judged_all),
                sum(judged_all),
                sum(judged_all) / len(judged_all) if judged_all else None,
            ]
        )
    return t


def geometry_tables(g: Geometry) -> list[Table]:
    sim = Table(
        "similarity",
        "Cosine similarity between role vectors",
        [Column("role")] + [Column(r, "float") for r in g.roles],
        note=g.note,
    )
    for role, row in zip(g.roles, g.similarity.matrix, strict=True):
        sim.rows.append([role, *row])
    out = [sim]
    if g.projection is not None:
        ex = g.projection.explained
        pca = Table(
            "pca",
            f"PCA of role vectors (PC1 {100 * ex[0]:.0f}%, PC2 {100 * ex[1]:.0f}% of variance)",
            [Column("role"), Column("domain"), Column("PC1", "float"), Column("PC2", "float")],
        )
        for role, (x, y) in zip(g.projection.roles, g.projection.coords, strict=True):
            pca.rows.append([role, g.domains.get(role), x, y])
        out.append(pca)
    n_layers = max((len(v) for v in g.norms.values()), default=0)
    norms = Table(
        "norms",
        "‖d‖ per layer",
        [Column("role")] + [Column(f"L{i}", "float") for i in range(n_layers)],
    )
    for role, values in g.norms.items():
        norms.rows.append([role, *values])
    out.append(norms)
    return out


@dataclass(frozen=True)
class FigurePNG:
    name: str  # file stem
    title: str
    png: bytes


# --- assembling the report ----------------------------------------------------------------------------
@dataclass
class Section:
    title: str
    text: list[str] = field(default_factory=list)  # paragraphs (plain text)
    figures: list[FigurePNG] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    collapsed: list[Table] = field(default_factory=list)  # long tables, folded away in HTML
    preformatted: str = ""


@dataclass
class Report:
    title: str
    banner: list[str]
    sections: list[Section]
    csv_tables: list[Table]  # what goes to tables/*.csv (numeric variants where they differ)
    #: The first screen's summary lines of the main findings, and how they were computed.
    findings: list[str] = field(default_factory=list)
    findings_note: str = ""

    @property
    def figures(self) -> list[FigurePNG]:
        return [f for s in self.sections for f in s.figures]


def _compact(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


def _manifest_lines(data: RunData) -> tuple[list[str], str]:
    """The header: model, seed and what was sampled (``preset``/``sampled``, else the arguments)."""
    m = data.manifest
    lines = []
    model = m.get("model") or data.selection.get("model")
    fingerprint = m.get("model_fingerprint") or data.selection.get("model_fingerprint")
    if isinstance(model, Mapping):
        fingerprint = fingerprint or model.get("fingerprint")
        model = model.get("name", model)
    if model is not None:
        lines.append(f"Model: {_compact(model)}")
    if fingerprint:
        lines.append(f"Model fingerprint: {fingerprint}")
    args = m.get("arguments", m.get("args"))
    args = args if isinstance(args, Mapping) else {}
    for key in ("seed", "split_seed"):
        value = m.get(key, args.get(key, data.selection.get(key)))
        if value is not None:
            lines.append(f"{key.replace('_', ' ').capitalize()}: {value}")
    shown = False
    for key in ("preset", "sampled"):
        if key in m:
            shown = True
            lines.append(f"{key.capitalize()}: {_compact(m[key])}")
    if not shown and args:
        lines.append(f"Arguments: {_compact(args)}")
    if "layers" in data.selection:
        lines.append(f"Layers searched on validation: {data.selection['layers']}")
    if isinstance(m.get("versions"), Mapping):
        lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
    if m.get("time"):
        lines.append(f"Run time (UTC): {m['time']}")
    if not m:
        lines.append("No manifest.json in the run folder.")
    full = json.dumps(m, indent=2, ensure_ascii=False, default=str) if m else ""
    return lines, full


def _source_text(settings: Mapping[str, Any]) -> str:
    """settings.json's question source: a string, or an object whose ``source`` names it."""
    mcq = settings.get("mcq")
    if isinstance(mcq, Mapping):
        rest = {k: v for k, v in mcq.items() if k != "source" and v not in (None, "", [], {})}
        name = _compact(mcq.get("source")) if mcq.get("source") is not None else "unknown"
        details = ", ".join(f"{k}: {_compact(v)}" for k, v in rest.items())
        return name + (f" ({details})" if details else "")
    if mcq is not None and mcq != "":
        return _compact(mcq)
    split = settings.get("split")
    if isinstance(split, Mapping) and split.get("source"):
        return f"{_compact(split['source'])} (the split's source; settings.json does not pin `mcq`)"
    return "unknown (settings.json does not name it)"


def _scoring_text(data: RunData) -> str:
    pinned = data.settings.get("scoring")
    if isinstance(pinned, str) and pinned:
        return pinned
    if data.record_scoring:
        return ", ".join(data.record_scoring) + " (from records.jsonl; settings.json does not pin it)"
    return "unknown (neither settings.json nor the records say; older runs were letter scored)"


def _choices_text(choices: Mapping[int, int]) -> str:
    if not choices:
        return "unknown (the records carry no probabilities)"
    if len(choices) == 1:
        ((n, count),) = choices.items()
        return f"{n} (all {count} questions)"
    return ", ".join(f"{n} ({count} questions)" for n, count in choices.items())


def benchmark_lines(data: RunData) -> list[str]:
    """Which questions and which scoring rule made the records, and what guessing would score."""
    a = data.analysis
    chance = ", ".join(f"{d} {fmt(a.chance[d], 'acc')}" for d in a.domains if d in a.chance)
    return [
        f"Question source: {_source_text(data.settings)}",
        f"Scoring rule: {_scoring_text(data)}",
        f"Choices per question: {_choices_text(data.choices)}",
        f"Chance level (test split, mean of 1/number of choices): {chance or 'unknown'}",
    ]


def build(data: RunData) -> Report:
    """All sections, tables and figures of the report, in memory."""
    a = data.analysis
    banner = [
        "How to read: accuracies are on the test split with n questions and a 95% Wilson interval; "
        "every condition is paired with the baseline on the same questions; p is McNemar's test "
        "(exact below 25 discordant pairs), shown beside its Holm and Benjamini–Hochberg adjusted values "
        "over the family each table states; chance = 1/number of choices, averaged over the questions."
    ]
    if a.min_n < SMALL_N:
        banner.append(
            f"Small sample: the smallest cell has n = {a.min_n} questions (< {SMALL_N}). Differences "
            f"are not significant unless the adjusted p (Holm) < {SIGNIFICANCE:g} — most are noise at "
            "this size."
        )
    if a.cells:
        banner.append(significance_counts(a))
    if a.unpaired:
        banner.append(f"{a.unpaired} condition rows had no baseline row for their question and are left out.")
    csv_tables: list[Table] = []
    sections: list[Section] = []

    lines, full = _manifest_lines(data)
    sections.append(Section("Run", text=benchmark_lines(data) + lines, preformatted=full))

    base = Section("Baseline and chosen sites")
    if a.baseline:
        base.figures.append(FigurePNG("baseline", "baseline accuracy", figures.baseline_figure(a)))
    base.tables.append(baseline_table(a))
    if data.selection.get("roles"):
        base.tables.append(selection_table(data))
    else:
        base.text.append("No selection.json: the validation sweep's choices are not available.")
    sections.append(base)
    csv_tables += base.tables

    if not a.cells:
        sections.append(
            Section(
                "Role × domain results",
                text=["No test-split condition records to compare with the baseline yet."],
            )
        )
    else:
        summary = Section("In-domain vs out-of-domain (paper Table 3 form)")
        summary.tables += [summary_table(a), by_domain_table(a)]
        sections.append(summary)
        csv_tables += summary.tables

        grid = Section(
            "Role × domain relative change",
            text=[
                "Relative change of accuracy against the baseline, per role (rows) and domain "
                "(columns); boxed/bracketed = the role's own domain; * = McNemar p < 0.05 after Holm's "
                "adjustment over the role × domain cells of that condition (each table states its family)."
            ],
        )
        for label in a.labels:
            grid.figures.append(FigurePNG(f"heatmap_{slug(label)}", label, figures.heatmap_figure(a, label)))
            grid.tables.append(relative_table(a, label))
            csv_tables.append(relative_csv_table(a, label))
        grid.collapsed.append(cells_table(a))
        csv_tables.append(grid.collapsed[-1])
        sections.append(grid)

        bars = Section("Persona prompt vs role vector")
        bars.figures.append(
            FigurePNG("persona_vs_vector", "persona vs vector", figures.persona_bars_figure(a))
        )
        bars.tables.append(persona_vs_vector_table(a))
        csv_tables += bars.tables
        sections.append(bars)

    trust = Section("Which vectors to trust")
    rows = diagnostic_rows(data.diagnostics.value or {}, a.roles)
    if rows:
        effects = chosen_effects(data)
        trust.text.append(
            "Each chosen vector is checked at its site against two nulls: random directions of the same "
            "norm, and label shuffles (the same role and base prompts pooled and split again at random, "
            "which a difference of means of noise also passes against random directions). A vector that "
            "does not beat both on a diagnostic is flagged. The figure sets each diagnostic "
            "against the vector's effect on its own domain, so one sees whether reliable vectors steer "
            "better."
        )
        if any(r.role in effects for r in rows):
            trust.figures.append(
                FigurePNG("diagnostics", "diagnostics vs effect", figures.diagnostics_figure(rows, effects))
            )
        else:
            trust.text.append("No test records of the chosen additions yet: the figure needs them.")
        trust.tables.append(diagnostics_table(rows, effects))
        csv_tables += trust.tables
    elif data.diagnostics.value is not None:
        trust.text.append("diagnostics.json holds no roles.")
    else:
        trust.text.append(f"Diagnostics are absent: {data.diagnostics.missing}.")
    sections.append(trust)

    sweep = Section("Layer sweep (validation split)")
    if data.sweep.value:
        panels = sweep_panels(
            data.sweep.value, data.selection, a.roles, role_map=data.role_map, chance=data.val_chance
        )
        if panels:
            sweep.text.append(
                "Accuracy on the validation split by layer: for addition the best position at each layer, "
                "for ablation the mean over positions; grey line = baseline, dashed = chance, "
                "star = chosen site."
            )
            sweep.figures.append(FigurePNG("sweep", "layer sweep", figures.sweep_figure(panels)))
            sweep.collapsed.append(sweep_table(panels))
            csv_tables.append(sweep.collapsed[-1])
        else:
            sweep.text.append("sweep.jsonl holds no per-role rows.")
    else:
        sweep.text.append(f"Not run: {data.sweep.missing}.")
    sections.append(sweep)

    interp = Section("Interpretation")
    value = data.interpret.value
    if value:
        interp.text.append(
            f"Unsteered answer to {value.get('prompt', '?')!r}: {value.get('unsteered', '')!r}. The steered "
            f"answers add α={value.get('alpha')}·d at the role's chosen layer, "
            + (
                "only at the token positions of the placeholder in the prompt."
                if value.get("where") == "placeholder"
                else "at every position."
            )
        )
        interp.tables += [patchscope_table(value), logit_lens_table(value)]
        judged = judge_table(data)
        if judged is None:
            interp.text.append("No LLM judge was used.")
        else:
            judge = value.get("judge") or {}
            interp.text.append(f"Judge: {judge.get('model')} at {judge.get('url')}.")
            interp.tables.append(judged)
        csv_tables += interp.tables
    else:
        interp.text.append(f"Not run: {data.interpret.missing}.")
    sections.append(interp)

    geo = Section("Geometry of the role vectors")
    vectors = data.vectors.value
    if not isinstance(vectors, RoleVectors) or not vectors.roles:
        geo.text.append(f"Not run: {data.vectors.missing or 'the vector file holds no roles'}.")
    else:
        geometry = role_geometry(vectors, data.selection, role_map=data.role_map)
        geo.text.append(geometry.note)
        geo.figures.append(FigurePNG("similarity", "cosine similarity", figures.similarity_figure(geometry)))
        if geometry.projection is not None:
            geo.figures.append(FigurePNG("pca", "PCA", figures.pca_figure(geometry)))
        else:
            geo.text.append("PCA needs at least two roles.")
        geo.figures.append(FigurePNG("norms", "norm by layer", figures.norms_figure(geometry)))
        geo.collapsed += geometry_tables(geometry)
        csv_tables += geo.collapsed
    sections.append(geo)
    title = f"rolevec report: {data.run_dir.name}"
    found = findings(a) if a.cells else None
    return Report(
        title,
        banner,
        sections,
        csv_tables,
        findings=found.lines if found else [],
        findings_note=found.note if found else "",
    )


CSS = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:12px;margin:.5em 0}
th,td{border:1px solid #ccc;padding:2px 6px;vertical-align:top}
th{background:#f3f3f3;position:sticky;top:0}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.scroll{overflow-x:auto;max-height:40em}
.findings{background:#eef5ff;border:1px solid #7aa7e0;padding:.6em 1em;margin:1em 0}
.banner{background:#fff4d6;border:1px solid #e0b84a;padding:.6em 1em;margin:1em 0}
.note{color:#555;font-size:12px}
img{max-width:100%;height:auto;display:block;margin:.5em 0}
pre{background:#f6f6f6;padding:.5em;overflow-x:auto;font-size:11px}
"""


def render_html(report: Report) -> str:
    """One self-contained XHTML-compatible page; figures are embedded as base64 PNG."""
    parts = [
        "<!DOCTYPE html>",
        '<html xmlns="http://www.w3.org/1999/xhtml" lang="en">',
        '<head><meta charset="utf-8" />',
        f"<title>{_e(report.title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(report.title)}</h1>",
    ]
    if report.findings:
        items = "".join(f"<li>{_e(line)}</li>" for line in report.findings)
        parts.append(
            f'<div class="findings"><strong>Main findings</strong><ul>{items}</ul>'
            f'<p class="note">{_e(report.findings_note)}</p></div>'
        )
    parts += [f'<div class="banner">{_e(line)}</div>' for line in report.banner]
    for section in report.sections:
        parts.append(f"<h2>{_e(section.title)}</h2>")
        parts += [f"<p>{_e(line)}</p>" for line in section.text]
        if section.preformatted:
            parts.append(
                f"<details><summary>manifest.json</summary><pre>{_e(section.preformatted)}</pre></details>"
            )
        for fig in section.figures:
            data = base64.b64encode(fig.png).decode("ascii")
            parts.append(f'<img src="data:image/png;base64,{data}" alt="{_e(fig.title)}" />')
        parts += [table_html(t) for t in section.tables]
        parts += [table_html(t, collapsed=True) for t in section.collapsed]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def render_markdown(report: Report) -> str:
    parts = [f"# {report.title}", ""]
    if report.findings:
        parts += ["**Main findings**", ""]
        parts += [f"- {html.escape(printable(line), quote=False)}" for line in report.findings]
        parts += ["", html.escape(printable(report.findings_note), quote=False), ""]
    parts += [f"> {line}\n" for line in report.banner]
    for section in report.sections:
        parts += [f"## {section.title}", ""]
        for line in section.text:
            parts += [html.escape(printable(line), quote=False), ""]
        if section.preformatted:
            parts += [
                "<details><summary>manifest.json</summary>",
                "",
                "```json",
                section.preformatted,
                "```",
                "",
                "</details>",
                "",
            ]
        for fig in section.figures:
            parts += [f"![{fig.title}](figures/{fig.name}.png)", ""]
        parts += [table_markdown(t) for t in (*section.tables, *section.collapsed)]
    return "\n".join(parts).rstrip() + "\n"


@dataclass(frozen=True)
class ReportFiles:
    html: Path
    markdown: Path
    tables: tuple[Path, ...]
    figures: tuple[Path, ...]


def write_report(
    run_dir: str | Path,
    *,
    force: bool = False,
    data: RunData | None = None,
    role_map: Mapping[str, str] | None = None,
) -> ReportFiles:
    """Build the report of RUN_DIR and write report.html, report.md, tables/*.csv and figures/*.png.

    Refuses to overwrite an existing report unless ``force``; everything is computed before the first
    file is written, and each file is written atomically. ``data`` is the run as :func:`load_run` read it
    (read here when not given).

    Args:
        run_dir: The run folder (``rolevec run --out``); it needs a ``records.jsonl``.
        force: Overwrite an existing report (default ``False``).
        data: The run already read with :func:`load_run` (default: read from ``run_dir``).
        role_map: Role -> domain for roles outside the paper's table (used when ``data`` is not given).

    Returns:
        The ``ReportFiles``: paths of the HTML and Markdown reports, tables and figures written.

    Example:
        ```python
        files = write_report("runs/quick", force=True)
        print(files.html, len(files.figures))
        ```
    """
    data = load_run(run_dir, role_map=role_map) if data is None else data
    root = data.run_dir
    html_path, md_path = root / "report.html", root / "report.md"
    if not force:
        for path in (html_path, md_path):
            if path.exists():
                raise RolevecError(f"{path} already exists: pass `force=True` to rebuild the report")
    report = build(data)
    html_text = render_html(report)
    md_text = render_markdown(report)
    outputs: list[tuple[Path, Callable[[Path], Any]]] = []
    for table in report.csv_tables:
        text = table_csv(table)
        outputs.append((root / "tables" / f"{table.name}.csv", _writer_text(text)))
    for fig in report.figures:
        outputs.append((root / "figures" / f"{fig.name}.png", _writer_bytes(fig.png)))
    for path, write in outputs:
        atomic_write(path, write, force=True)
    atomic_write(md_path, _writer_text(md_text), force=True)
    atomic_write(html_path, _writer_text(html_text), force=True)
    return ReportFiles(
        html=html_path,
        markdown=md_path,
        tables=tuple(p for p, _ in outputs if p.suffix == ".csv"),
        figures=tuple(p for p, _ in outputs if p.suffix == ".png"),
    )


def _writer_text(text: str) -> Callable[[Path], Any]:
    return _writer_bytes(text.encode("utf-8"))


def _writer_bytes(blob: bytes) -> Callable[[Path], Any]:
    def write(tmp: Path) -> None:
        tmp.write_bytes(blob)
        tmp.chmod(0o644)  # a report is for sharing; the temporary file starts private

    return write


def summary_lines(files: ReportFiles) -> list[str]:
    return [
        f"wrote {files.html}",
        f"wrote {files.markdown}",
        f"wrote {len(files.tables)} tables to {files.html.parent / 'tables'}",
        f"wrote {len(files.figures)} figures to {files.html.parent / 'figures'}",
    ]


def console_summary(run_dir: str | Path, *, role_map: Mapping[str, str] | None = None) -> list[str]:
    """The headline table for a terminal: per role and condition, in-domain change and out-of-domain mean."""
    a = load_run(run_dir, role_map=role_map).analysis
    lines = [
        f"{'role':<22}{'condition':<14}{'in-domain acc (base)':<24}{'chance':>8}{'rel. change':>12}{'p':>8}"
        f"{'n':>6}{'OOD mean rel.':>15}"
    ]
    for role in a.roles:
        for label in a.labels:
            s = a.summary(role, label)
            if s is None or s.in_domain is None:
                continue
            d = s.in_domain
            acc = f"{d.accuracy:.3f} ({d.base_accuracy:.3f})"
            rel = "n/a" if math.isnan(d.rel_change) else f"{d.rel_change:.1f}%"  # a baseline of 0
            ood = "n/a" if math.isnan(s.ood_mean_rel) else f"{s.ood_mean_rel:.1f}%"
            level = a.chance.get(str(s.role_domain))
            chance = "n/a" if level is None else f"{level:.3f}"
            lines.append(
                f"{role:<22}{label:<14}{acc:<24}{chance:>8}{rel:>12}{d.p_value:>8.3f}{d.n:>6}{ood:>15}"
            )
    if a.min_n < SMALL_N:
        lines.append(
            f"(small sample: n = {a.min_n} in the smallest cell; differences are noise unless p < 0.05)"
        )
    return lines
