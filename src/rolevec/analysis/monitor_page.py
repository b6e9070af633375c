"""`rolevec monitor`'s outputs from :class:`~rolevec.analysis.monitor.Trace` objects: the HTML page, the
per-token table (CSV rows) and a line plot per role.

The page is self-contained (inline CSS, figures as data URIs, no script, no fonts or links to fetch), so
it opens offline and can be mailed. Each token is a ``<span class="tok">`` whose background is
:func:`colour` of its value on a diverging scale (blue below zero, white at zero, red above), one row of
tokens per role; its ``title`` holds the value (and z-score), ``data-v``/``data-z`` the exact numbers.
Colours are whole RGB triples, so the colour a browser computes for a span is exactly the one
:func:`colour` gives (tests/test_monitor_browser.py checks that in Chromium).
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

from .monitor import SEGMENTS, Trace

#: The scale's ends: RdBu's dark blue (most negative) and dark red (most positive); zero is white.
NEGATIVE = (33, 102, 172)
POSITIVE = (178, 24, 43)
WHITE = (255, 255, 255)
#: With z-scores, tokens are coloured by z on a fixed scale: ±3 and beyond are the full colour.
Z_SCALE = 3.0
#: A scale's share beyond which the token's text is drawn white (on the darker backgrounds).
DARK = 0.6
#: Underline colour per segment (the user text is not underlined: it is what is read).
SEGMENT_COLOURS = {
    "template": "#b8bec8",
    "user": "transparent",
    "post-instruction": "#8e6bbf",
    "generated": "#2e8b57",
}
CSV_HEADER = ("prompt", "token", "text", "segment", "role", "value", "z")


def colour(value: float, scale: float) -> tuple[int, int, int]:
    """The RGB colour of ``value`` on the diverging scale ``[-scale, scale]`` (clipped beyond it)."""
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"a colour scale must be a positive number, not {scale!r}")
    t = max(-1.0, min(1.0, value / scale)) if math.isfinite(value) else 0.0
    end = POSITIVE if t > 0 else NEGATIVE
    a = abs(t)
    return (
        round(WHITE[0] + a * (end[0] - WHITE[0])),
        round(WHITE[1] + a * (end[1] - WHITE[1])),
        round(WHITE[2] + a * (end[2] - WHITE[2])),
    )


def coloured_by(trace: Trace) -> Any:
    """What the page colours: the z-scores when the trace has them, else the values (``[roles, tokens]``)."""
    return trace.values if trace.z is None else trace.z


def scales(traces: Sequence[Trace]) -> dict[str, float]:
    """Each role's colour scale: :data:`Z_SCALE` with z-scores; else the largest ``|value|`` over every
    trace's user, post-instruction and generated tokens (the template's head, where the first token's
    activation is often huge, may exceed it and is then drawn at full colour)."""
    out: dict[str, float] = {}
    for trace in traces:
        for i, role in enumerate(trace.roles):
            if trace.z is not None:
                out[role] = Z_SCALE
                continue
            row = trace.values[i]
            kept = [abs(float(v)) for v, s in zip(row, trace.segments, strict=True) if s != "template"]
            top = max(kept or [abs(float(v)) for v in row])
            out[role] = max(out.get(role, 0.0), top)
    return {role: (s if math.isfinite(s) and s > 0 else 1.0) for role, s in out.items()}


def visible(piece: str) -> str:
    """A token's text as HTML with its whitespace shown: ``·`` a space, ``↵`` a newline, ``→`` a tab."""
    if piece == "":
        return '<i class="ws">∅</i>'
    out = []
    for ch in piece:
        if ch == " ":
            out.append('<i class="ws">·</i>')
        elif ch == "\n":
            out.append('<i class="ws">↵</i>')
        elif ch == "\t":
            out.append('<i class="ws">→</i>')
        elif ch == "\r":
            out.append('<i class="ws">␍</i>')
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f'<i class="ws">\\x{ord(ch):02x}</i>')
        else:
            out.append(html.escape(ch))
    return "".join(out)


def _fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:+.{digits}f}"


def _rgb(c: tuple[int, int, int]) -> str:
    return f"rgb({c[0]}, {c[1]}, {c[2]})"


def table_rows(traces: Sequence[Trace]) -> list[tuple[Any, ...]]:
    """One row per token per role (prompt index, token index, text, segment, role, value, z or ``""``)."""
    rows: list[tuple[Any, ...]] = []
    for p, trace in enumerate(traces):
        for r, role in enumerate(trace.roles):
            for t, (piece, segment) in enumerate(zip(trace.tokens, trace.segments, strict=True)):
                z = "" if trace.z is None else repr(float(trace.z[r, t]))
                rows.append((p, t, piece, segment, role, repr(float(trace.values[r, t])), z))
    return rows


def figure_png(trace: Trace, *, title: str = "") -> bytes:
    """One line plot per role of the per-token values (z-scores with statistics), segments shaded, as
    PNG bytes (its own Agg canvas: no pyplot state).

    The y range fits the tokens after the template's head; head tokens beyond it (the first token's
    activation is often far larger) are drawn at the edge as triangles.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(trace.roles)
    fig = Figure(figsize=(10, 0.6 + 1.7 * n))
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, 1, sharex=True, squeeze=False)[:, 0]
    shown = coloured_by(trace)
    x = list(range(len(trace.tokens)))
    spans = _segment_spans(trace.segments)
    for i, (ax, role) in enumerate(zip(axes, trace.roles, strict=True)):
        for segment, start, end in spans:
            if segment != "user":
                ax.axvspan(start - 0.5, end - 0.5, color=SEGMENT_COLOURS[segment], alpha=0.18, lw=0)
        ax.axhline(0.0, color="#888", lw=0.8)
        ys = shown[i].tolist()
        kept = [y for y, s in zip(ys, trace.segments, strict=True) if s != "template"] or ys
        lo, hi = min(0.0, *kept), max(0.0, *kept)
        pad = 0.08 * (hi - lo) or 1.0
        lo, hi = lo - pad, hi + pad
        ax.plot(x, [min(hi, max(lo, y)) for y in ys], color="#1d2330", lw=1.1, marker=".", ms=3)
        for edge, marker, off in ((hi, "^", [j for j, y in enumerate(ys) if y > hi]),
                                  (lo, "v", [j for j, y in enumerate(ys) if y < lo])):  # fmt: skip
            if off:
                ax.plot(
                    off, [edge] * len(off), ls="none", marker=marker, color="#b2182b", ms=5, clip_on=False
                )
        ax.set_ylim(lo, hi)
        ax.axvline(trace.n_prompt - 1, color="#b2182b", lw=0.9, ls="--")
        ax.set_ylabel(f"{role}\n{'z' if trace.z is not None else 'projection'}", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.margins(x=0.01)
    axes[-1].set_xlabel(
        "token (dashed: the last prompt token; shaded: template, post-instruction, generated; "
        "triangles: off the scale)",
        fontsize=8,
    )
    if title:
        axes[0].set_title(" ".join(title.split()), fontsize=9, loc="left")  # no tabs or newlines
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _segment_spans(segments: Sequence[str]) -> list[tuple[str, int, int]]:
    spans: list[tuple[str, int, int]] = []
    for i, s in enumerate(segments):
        if spans and spans[-1][0] == s:
            spans[-1] = (s, spans[-1][1], i + 1)
        else:
            spans.append((s, i, i + 1))
    return spans


CSS = """
*{box-sizing:border-box}
body{margin:0;background:#f4f5f7;color:#1d2330;
 font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif}
main{max-width:1180px;margin:0 auto;padding:20px 24px 40px}
h1{font-size:22px;margin:4px 0 2px}
h2{font-size:17px;margin:0 0 8px}
.sub{color:#5b6472;margin:0 0 14px}
.card{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:14px 18px;margin:16px 0}
table{border-collapse:collapse;font-size:13px}
th,td{padding:3px 10px 3px 0;text-align:left;vertical-align:top}
th{color:#5b6472;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums;
 font-family:ui-monospace,"DejaVu Sans Mono",monospace}
table.summary td,table.summary th{border-bottom:1px solid #eef0f3;padding-right:18px}
.legend{display:grid;grid-template-columns:max-content 260px max-content;gap:6px 12px;align-items:center;
 font-size:12px}
.bar{height:14px;border:1px solid #c9ced6;border-radius:3px}
.ticks{display:flex;justify-content:space-between;font-size:11px;color:#5b6472;width:260px}
.segkey{display:flex;gap:16px;flex-wrap:wrap;font-size:12px;margin-top:10px}
.segkey span{padding:0 3px 1px;border-bottom:3px solid}
.text{white-space:pre-wrap;background:#f8f9fb;border:1px solid #eef0f3;border-radius:6px;padding:8px 10px;
 margin:6px 0 10px;font-size:13px;max-height:16em;overflow:auto}
.label{font-size:12px;color:#5b6472;margin-top:8px}
.role-row{display:grid;grid-template-columns:170px minmax(0,1fr);gap:14px;padding:10px 0;
 border-top:1px solid #eef0f3}
.role-name{font-weight:600;word-break:break-all}
.role-name small{display:block;font-weight:400;color:#5b6472}
.tokens{display:flex;flex-wrap:wrap;align-items:flex-start;
 font:13px/1.3 ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace}
.tok{padding:3px 2px 1px;margin:0 0 5px;white-space:pre;border-bottom:3px solid transparent;color:#1d2330}
.tok.dark{color:#fff}
.tok .ws{font-style:normal;color:rgba(29,35,48,.38)}
.tok.dark .ws{color:rgba(255,255,255,.6)}
.tok:hover{outline:2px solid #1d2330;outline-offset:-2px}
.nl{flex-basis:100%;height:0}
img.plot{max-width:100%;height:auto;margin-top:10px}
nav ol{margin:4px 0;padding-left:22px;font-size:13px}
"""


def _legend(traces: Sequence[Trace], role_scales: Mapping[str, float]) -> str:
    zs = bool(traces) and traces[0].z is not None
    rows = []
    for role, s in role_scales.items():
        low, high = _rgb(colour(-s, s)), _rgb(colour(s, s))
        name = "z-score (every role)" if zs else html.escape(role)
        note = f"±{Z_SCALE:g} and beyond at full colour" if zs else f"scale ±{s:.3g}"
        rows.append(
            f'<div>{name}</div><div><div class="bar" style="background:linear-gradient(to right, {low}, '
            f'rgb(255, 255, 255), {high})"></div><div class="ticks"><span>{-s:+.3g}</span><span>0</span>'
            f"<span>{s:+.3g}</span></div></div><div>{note}</div>"
        )
        if zs:
            break
    keys = "".join(
        f'<span style="border-bottom-color:{SEGMENT_COLOURS[s] if s != "user" else "#dde1e7"}">'
        f"{html.escape(s)}</span>"
        for s in SEGMENTS
    )
    what = (
        "Colour: each token's z-score against the base prompts' pooled token projections."
        if zs
        else "Colour: each token's projection on the role's unit direction, on the role's own scale "
        "(the largest |value| outside the template's head)."
    )
    return (
        f'<section class="card"><h2>Legend</h2><p class="sub">{what} Hover a token for its value.</p>'
        f'<div class="legend">{"".join(rows)}</div><div class="segkey">Underline: {keys}</div></section>'
    )


def _summary_table(trace: Trace) -> str:
    zs = trace.z is not None
    gen = trace.generated_text is not None
    head = "<tr><th>role</th><th>last prompt token</th><th>mean over user text</th>"
    head += "<th>mean over generated tokens</th>" if gen else ""
    head += "</tr>"

    def cell(value: float | None, z: float | None) -> str:
        text = _fmt(value)
        if zs:
            text += f" (z {_fmt(z, 2)})"
        return f'<td class="num">{text}</td>'

    body = []
    for role in trace.roles:
        s = trace.summaries[role]
        row = f"<tr><td>{html.escape(role)}</td>{cell(s.last, s.last_z)}{cell(s.user_mean, s.user_mean_z)}"
        row += cell(s.generated_mean, s.generated_mean_z) if gen else ""
        body.append(row + "</tr>")
    return f'<table class="summary">{head}{"".join(body)}</table>'


def _token_rows(trace: Trace, role_scales: Mapping[str, float]) -> str:
    shown = coloured_by(trace)
    rows = []
    for r, role in enumerate(trace.roles):
        scale = role_scales[role]
        spans = []
        for t, (piece, segment) in enumerate(zip(trace.tokens, trace.segments, strict=True)):
            value = float(trace.values[r, t])
            z = None if trace.z is None else float(trace.z[r, t])
            shade = float(shown[r, t])
            c = colour(shade, scale)
            dark = " dark" if abs(shade) / scale > DARK else ""
            tip = f"{role} · token {t} {piece!r} · {segment} · value {value:+.4f}"
            tip += "" if z is None else f" · z {z:+.2f}"
            data = f' data-v="{value!r}"' + ("" if z is None else f' data-z="{z!r}"')
            spans.append(
                f'<span class="tok seg-{segment}{dark}" style="background-color:{_rgb(c)}" '
                f'title="{html.escape(tip, quote=True)}" data-t="{t}"{data}>{visible(piece)}</span>'
            )
            if "\n" in piece:
                spans.append('<span class="nl"></span>')
        rows.append(
            f'<div class="role-row" data-role="{html.escape(role, quote=True)}">'
            f'<div class="role-name">{html.escape(role)}<small>layer {trace.layer}'
            f"{'' if trace.z is not None else f' · scale ±{scale:.3g}'}</small></div>"
            f'<div class="tokens">{"".join(spans)}</div></div>'
        )
    return "".join(rows)


def render_html(
    traces: Sequence[Trace],
    settings: Mapping[str, str],
    *,
    figures: Sequence[bytes | None] = (),
    title: str = "rolevec monitor",
) -> str:
    """The page: settings, legend, then per trace its prompt (and answer), summary table, token rows and
    line plot.

    Args:
        traces: The traces, one section each.
        settings: Label -> text, shown as a table at the top (model, vectors, layer, steering, ...).
        figures: Per trace, the PNG of :func:`figure_png` to embed (or ``None``).
        title: The page title.
    """
    role_scales = scales(traces)
    parts = [
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
        f"<body><main><h1>{html.escape(title)}</h1>"
        f'<p class="sub">Per-token projections on role vectors: the residual at the input of the layer, '
        f"dotted with each role's unit direction.</p>",
        '<section class="card"><h2>Settings</h2><table>'
        + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in settings.items())
        + "</table></section>",
        _legend(traces, role_scales),
    ]
    if len(traces) > 1:
        items = "".join(
            f'<li><a href="#prompt-{i}">{html.escape(t.prompt[:90])}</a></li>' for i, t in enumerate(traces)
        )
        parts.append(f'<nav class="card"><h2>Prompts</h2><ol start="0">{items}</ol></nav>')
    for i, trace in enumerate(traces):
        section = [f'<section class="card trace" id="prompt-{i}"><h2>Prompt {i}</h2>']
        if trace.system is not None:
            section.append(
                f'<div class="label">system</div><div class="text">{html.escape(trace.system)}</div>'
            )
        section.append(f'<div class="label">prompt</div><div class="text">{html.escape(trace.prompt)}</div>')
        if trace.generated_text is not None:
            section.append(
                f'<div class="label">generated{" (steered)" if trace.steering else ""}</div>'
                f'<div class="text">{html.escape(trace.generated_text)}</div>'
            )
        section.append(_summary_table(trace))
        section.append(_token_rows(trace, role_scales))
        png = figures[i] if i < len(figures) else None
        if png is not None:
            data = base64.b64encode(png).decode("ascii")
            section.append(
                f'<img class="plot" alt="per-token projections of prompt {i}, one line per role" '
                f'src="data:image/png;base64,{data}">'
            )
        section.append("</section>")
        parts.append("".join(section))
    parts.append("</main></body></html>\n")
    return "".join(parts)
