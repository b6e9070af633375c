"""The report's figures as PNG bytes, drawn with matplotlib's object API.

Each function builds a ``Figure`` with its own Agg canvas — no pyplot, no global backend switch, no
figure left registered anywhere — so importing or calling this never changes the host's matplotlib state.
Every figure of accuracies draws the chance level (1/number of choices) as a dashed line, since it
differs between benchmarks (0.25 for MMLU, 0.2 for 5-choice MedQA, 0.1 for MMLU-Pro).
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .geometry import Geometry
from .tables import DIAGNOSTICS, Analysis, DiagnosticRow, SweepPanel, condition_holm, star

if TYPE_CHECKING:
    from ..vectors.diagnostics import Diagnostics

DPI = 110
#: How the chance level is drawn on every accuracy figure.
CHANCE_STYLE: dict[str, Any] = {"color": "tab:red", "linestyle": "--", "linewidth": 1}


def png_bytes(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def _figure(width: float, height: float) -> Any:
    # Figure with its own Agg canvas: no pyplot, no global backend switch, nothing left open.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _domain_colours(domains: Sequence[str | None]) -> dict[str | None, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    unique = list(dict.fromkeys(domains))
    return {d: cmap(i % 10) for i, d in enumerate(unique)}


def sweep_figure(panels: Sequence[SweepPanel]) -> bytes:
    from matplotlib.ticker import MaxNLocator

    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = _figure(3.4 * cols, 2.5 * rows + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, p in zip(axes.flat, panels, strict=False):
        for curve in p.curves:
            style = ":" if curve.label.startswith("ablate") else "-"
            ax.plot(curve.layers, curve.accuracy, style, marker=".", markersize=3, label=curve.label)
        if not math.isnan(p.baseline):
            ax.axhline(p.baseline, color="grey", linewidth=1, label="baseline")
        if not math.isnan(p.chance):
            ax.axhline(p.chance, label="chance", **CHANCE_STYLE)
        if p.chosen is not None:
            ax.plot([p.chosen[0]], [p.chosen[1]], "k*", markersize=9, label="chosen")
        ax.set_title(f"{p.role} ({p.domain}, n={p.n})", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("layer", fontsize=7)
        ax.set_ylabel("val. accuracy", fontsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    by_label: dict[str, Any] = {}
    for ax in axes.flat[: len(panels)]:  # every curve once, whichever panel has it
        for handle, name in zip(*ax.get_legend_handles_labels(), strict=True):
            by_label.setdefault(name, handle)
    handles, labels = list(by_label.values()), list(by_label)
    fig.legend(handles, labels, loc="upper center", ncol=min(5, len(labels)), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (2.5 * rows + 0.4)))
    return png_bytes(fig)


def baseline_figure(a: Analysis) -> bytes:
    """Baseline accuracy per domain with its 95% interval (and acc_norm for continuation scoring), each
    domain's chance level a dashed segment over its bars."""
    domains = [b.domain for b in a.baseline]
    norm = a.continuation and any(b.n_norm for b in a.baseline)
    width = 0.38 if norm else 0.6
    fig = _figure(max(4.0, 0.9 * len(domains) + 2.0), 3.6)
    ax = fig.add_subplot()
    xs = list(range(len(domains)))
    acc = [b.accuracy for b in a.baseline]
    errors = [
        [max(0.0, v - b.ci[0]) for v, b in zip(acc, a.baseline, strict=True)],
        [max(0.0, b.ci[1] - v) for v, b in zip(acc, a.baseline, strict=True)],
    ]
    shift = -width / 2 if norm else 0.0
    ax.bar([x + shift for x in xs], acc, width, yerr=errors, capsize=2, label="acc", color="tab:blue")
    if norm:
        ax.bar(
            [x + width / 2 for x in xs],
            [b.accuracy_norm for b in a.baseline],
            width,
            label="acc_norm",
            color="tab:cyan",
        )
    labelled = False
    for x, b in zip(xs, a.baseline, strict=True):
        if not math.isnan(b.chance):
            ax.hlines(b.chance, x - 0.45, x + 0.45, label=None if labelled else "chance", **CHANCE_STYLE)
            labelled = True
    ax.set_xticks(xs, [f"{b.domain}\nn={b.n}" for b in a.baseline], fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy", fontsize=8)
    ax.set_title("Baseline accuracy per domain (test split; dashed = chance)", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return png_bytes(fig)


def heatmap_figure(a: Analysis, label: str) -> bytes:
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.patches import Rectangle

    roles = [r for r in a.roles if any(a.cell(r, label, d) for d in a.domains)]
    values = [[math.nan] * len(a.domains) for _ in roles]
    marks = [[""] * len(a.domains) for _ in roles]
    adjusted = condition_holm(a, label)  # the stars of the matching table: Holm over this condition
    for i, role in enumerate(roles):
        for j, d in enumerate(a.domains):
            c = a.cell(role, label, d)
            if c is not None and not math.isnan(c.stats.rel_change):
                values[i][j] = c.stats.rel_change
                marks[i][j] = f"{c.stats.rel_change:+.0f}{star(adjusted.get((role, d), 1.0))}"
    finite = [abs(v) for row in values for v in row if not math.isnan(v)]
    limit = max([1.0, *finite])
    fig = _figure(1.0 * len(a.domains) + 2.6, 0.34 * len(roles) + 1.6)
    ax = fig.add_subplot()
    import numpy as np

    grid = np.ma.masked_invalid(np.array(values, dtype=float))
    from matplotlib import colormaps

    cmap = colormaps["RdBu"].with_extremes(bad="#dddddd")
    image = ax.imshow(grid, cmap=cmap, norm=TwoSlopeNorm(0.0, -limit, limit), aspect="auto")
    for i, role in enumerate(roles):
        for j, d in enumerate(a.domains):
            if marks[i][j]:
                strong = abs(values[i][j]) > 0.6 * limit
                ax.text(
                    j, i, marks[i][j], ha="center", va="center", fontsize=7, color="white" if strong else "k"
                )
            if a.role_domain.get(role) == d:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="k", linewidth=1.5))
    ax.set_xticks(range(len(a.domains)), [f"{d}\n{a.column_n(label, d)}" for d in a.domains], fontsize=7)
    ax.set_yticks(range(len(roles)), roles, fontsize=7)
    ax.set_title(f"Relative change of accuracy (%): {label}  (* Holm p<0.05, box = own domain)", fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8).ax.tick_params(labelsize=7)
    fig.tight_layout()
    return png_bytes(fig)


def persona_bars_figure(a: Analysis) -> bytes:
    """Horizontal grouped bars (one group per role, top to bottom), so many roles stay readable."""
    labels = list(a.labels)
    roles = list(a.roles)
    height = 0.8 / max(1, len(labels))
    fig = _figure(7.5, max(3.2, 0.12 * len(roles) * max(1, len(labels)) + 1.4))
    ax = fig.add_subplot()
    for k, label in enumerate(labels):
        ys, xs, lows, highs = [], [], [], []
        for i, role in enumerate(roles):
            s = a.summary(role, label)
            if s is None or s.in_domain is None or math.isnan(s.in_domain.rel_change):
                continue
            low, high = s.in_domain.rel_ci
            ys.append(i - 0.4 + height * (k + 0.5))
            xs.append(s.in_domain.rel_change)
            lows.append(max(0.0, s.in_domain.rel_change - low))
            highs.append(max(0.0, high - s.in_domain.rel_change))
        if ys:
            ax.barh(ys, xs, height, label=label, xerr=[lows, highs], capsize=2, error_kw={"linewidth": 0.7})
    ax.axvline(0, color="k", linewidth=0.8)
    ax.set_yticks(range(len(roles)), [f"{r} ({a.role_domain.get(r)})" for r in roles], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("relative change of accuracy on the role's own domain (%)", fontsize=8)
    ax.set_title("Persona prompt vs role vector, own domain (error bars: 95% CI)", fontsize=9)
    if ax.get_legend_handles_labels()[0]:  # no bars where every baseline was 0 (no relative change)
        ax.legend(fontsize=7, loc="best")
    else:
        note = "no relative change to show (baseline accuracy 0)"
        ax.text(0.5, 0.5, note, ha="center", transform=ax.transAxes)
    fig.tight_layout()
    return png_bytes(fig)


def similarity_figure(g: Geometry) -> bytes:
    import numpy as np

    n = len(g.roles)
    fig = _figure(0.32 * n + 2.8, 0.32 * n + 1.8)
    ax = fig.add_subplot()
    matrix = np.ma.masked_invalid(np.array(g.similarity.matrix, dtype=float))
    from matplotlib import colormaps

    cmap = colormaps["RdBu_r"].with_extremes(bad="#dddddd")
    image = ax.imshow(matrix, cmap=cmap, vmin=-1, vmax=1)
    if n <= 16:
        for i in range(n):
            for j in range(n):
                value = g.similarity.matrix[i][j]
                if not math.isnan(value):
                    colour = "white" if abs(value) > 0.6 else "k"
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6, color=colour)
    domains = [g.domains.get(r) for r in g.roles]
    for i in range(1, n):
        if domains[i] != domains[i - 1]:
            ax.axhline(i - 0.5, color="k", linewidth=0.8)
            ax.axvline(i - 0.5, color="k", linewidth=0.8)
    ax.set_xticks(range(n), g.roles, rotation=90, fontsize=7)
    ax.set_yticks(range(n), g.roles, fontsize=7)
    site = g.similarity.site
    ax.set_title(f"Cosine similarity (layer {site.layer}, position {site.position})", fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8).ax.tick_params(labelsize=7)
    fig.tight_layout()
    return png_bytes(fig)


def pca_figure(g: Geometry) -> bytes:
    proj = g.projection
    if proj is None:
        raise ValueError("a PCA figure needs a projection (two roles or more)")
    colours = _domain_colours([g.domains.get(r) for r in proj.roles])
    fig = _figure(6.4, 5.0)
    ax = fig.add_subplot()
    seen: set[str | None] = set()
    for role, (x, y) in zip(proj.roles, proj.coords, strict=True):
        domain = g.domains.get(role)
        ax.scatter([x], [y], color=colours[domain], label=None if domain in seen else str(domain), s=30)
        seen.add(domain)
        ax.annotate(role, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ex = proj.explained
    ax.set_xlabel(f"PC1 ({100 * ex[0]:.0f}% of variance)", fontsize=8)
    ax.set_ylabel(f"PC2 ({100 * ex[1]:.0f}% of variance)", fontsize=8)
    ax.set_title(f"Role vectors, layer {proj.site.layer}, position {proj.site.position}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return png_bytes(fig)


def norms_figure(g: Geometry) -> bytes:
    colours = _domain_colours([g.domains.get(r) for r in g.roles])
    fig = _figure(7.5, 4.4)
    ax = fig.add_subplot()
    styles = ["-", "--", ":", "-."]
    count: dict[str | None, int] = defaultdict(int)
    for role, values in g.norms.items():
        domain = g.domains.get(role)
        ax.plot(range(len(values)), values, styles[count[domain] % 4], color=colours[domain], label=role)
        count[domain] += 1
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer (input of block L)", fontsize=8)
    ax.set_ylabel("‖d‖", fontsize=8)
    ax.set_title("Role-vector norm by layer (colour = domain)", fontsize=9)
    ax.legend(fontsize=6, ncol=2 if len(g.norms) > 12 else 1, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return png_bytes(fig)


#: Each diagnostic's axis label, in the trust figures.
DIAGNOSTIC_LABELS = {
    "consistency": "consistency (mean cosine)",
    "separation": "separation (cross-fitted AUROC)",
    "stability": "stability (bootstrap cosine)",
}


def diagnostics_figure(rows: Sequence[DiagnosticRow], effects: dict[str, float]) -> bytes:
    """Each diagnostic (x) against the in-domain relative change of the role's chosen addition (y):
    filled = beats its random threshold, hollow = does not; dotted = the roles' mean threshold."""
    shown = [r for r in rows if r.role in effects and not math.isnan(effects[r.role])]
    fig = _figure(10.5, 3.4)
    axes = fig.subplots(1, len(DIAGNOSTICS), squeeze=False)[0]
    for ax, name in zip(axes, DIAGNOSTICS, strict=True):
        for r in shown:
            x, y = r.values[name], effects[r.role]
            if math.isnan(x):
                continue
            passed = name not in r.flagged
            ax.plot([x], [y], "o", color="tab:blue", markerfacecolor="tab:blue" if passed else "none")
            ax.annotate(r.role, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        limits = [r.bar(name) for r in shown if not math.isnan(r.bar(name))]
        if limits:
            ax.axvline(sum(limits) / len(limits), color="grey", linestyle=":", linewidth=1)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xlabel(DIAGNOSTIC_LABELS[name], fontsize=7)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("in-domain rel. change of the chosen addition (%)", fontsize=7)
    fig.suptitle(
        "Diagnostics vs steering effect (filled = beats random directions and label shuffles; dotted = mean "
        "threshold)",
        fontsize=8,
    )
    fig.tight_layout()
    return png_bytes(fig)


def diagnostics_layers_figure(
    results: Mapping[str, Mapping[int, Diagnostics]], best: Mapping[str, int]
) -> bytes:
    """Consistency, separation and stability (one panel each) against the layer, one line per role.

    Each role's bar (the higher of its two nulls' 95th percentiles at that layer) is the dashed line of the
    same colour; a filled marker beats it, a hollow one does not; a star marks the role's ``best`` layer.
    """
    from matplotlib import colormaps
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    cmap = colormaps["tab10"]
    colours = {role: cmap(i % 10) for i, role in enumerate(results)}
    fig = _figure(13.5, 4.2)
    axes = fig.subplots(1, len(DIAGNOSTICS), squeeze=False)[0]
    for ax, name in zip(axes, DIAGNOSTICS, strict=True):
        for role, by_layer in results.items():
            layers = sorted(by_layer)
            values = [getattr(by_layer[layer], name) for layer in layers]
            colour = colours[role]
            ax.plot(layers, values, "-", color=colour, linewidth=1.4)
            ax.plot(layers, [by_layer[layer].bar(name) for layer in layers], "--", color=colour, linewidth=1)
            for layer, value in zip(layers, values, strict=True):
                passed = name not in by_layer[layer].flagged
                face = colour if passed else "white"
                ax.plot([layer], [value], "o", color=colour, markerfacecolor=face, markersize=4)
            if role in best and best[role] in by_layer:
                top = best[role]
                ax.plot([top], [getattr(by_layer[top], name)], "*", color=colour, markersize=13,
                        markeredgecolor="black", markeredgewidth=0.6, zorder=5)  # fmt: skip
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer (input of block L)", fontsize=8)
        ax.set_title(DIAGNOSTIC_LABELS[name], fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=colours[r], linewidth=1.4, label=r) for r in results]
    handles += [
        Line2D([], [], color="grey", linestyle="--", linewidth=1, label="bar: higher null's 95th pct."),
        Line2D([], [], color="grey", marker="o", linestyle="", markerfacecolor="grey", label="beats the bar"),
        Line2D([], [], color="grey", marker="o", linestyle="", markerfacecolor="white", label="flagged"),
        Line2D([], [], color="grey", marker="*", linestyle="", markersize=11, markeredgecolor="black",
               label="highest separation"),
    ]  # fmt: skip
    axes[-1].legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    first = next(iter(results.values()), {})
    some = next(iter(first.values()), None)
    where = f" at position {some.position}" if some is not None else ""
    fig.suptitle(
        f"Which layers' role vectors to trust{where}: each diagnostic against its bar (dashed, the higher "
        "of the random-direction and label-shuffle 95th percentiles)",
        fontsize=9,
    )
    fig.tight_layout()
    return png_bytes(fig)
