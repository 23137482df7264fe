"""The Pareto page (``pareto.html``): inline SVG and a few lines of vanilla JS, nothing fetched.

MLflow's artifact viewer shows an HTML artifact in a sandboxed iframe. The plotly page it used to
get (4.6 MB, the library inlined) stayed blank for 25-63 s there; this one is a few tens of kB
and draws as soon as it is parsed: every mark is already in the markup, the script only adds the
hover box and the panel switch. Pure Python (no numpy/pandas): :mod:`autosparse.tracking.plots` turns the
trials frame into :class:`Panel` objects, this module only lays them out.

The axes are fitted to the feasible points (and the dense model), so infeasible or collapsed
candidates never squash the front into a line: points outside are drawn on the edge they lie
beyond, as a hollow triangle pointing outwards, and counted under the plot.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

FRONT_COLOR = "#d62728"
FEASIBLE_COLOR = "#1f77b4"
INFEASIBLE_COLOR = "#9a9a9a"
DENSE_COLOR = "#2ca02c"
LOG_SCALE_SPAN = 10.0  # a log x axis when the fitted x values span more than a decade
PAD = 0.05  # fraction of the span added on each side of the fitted axes

_W, _H = 820, 520
_LEFT, _RIGHT, _TOP, _BOTTOM = 72, 24, 16, 52


@dataclass(frozen=True)
class Point:
    """One trial in one panel. ``tip`` indexes the page's hover texts (one per trial)."""

    x: float
    y: float
    kind: str  # "front" | "feasible" | "infeasible"
    tip: int
    label: str = ""  # drawn beside front points (the trial number)


@dataclass(frozen=True)
class Panel:
    """Accuracy vs one cost objective."""

    name: str  # "accuracy vs size": the panel switch's entry
    title: str
    x_label: str
    y_label: str
    points: Sequence[Point]
    outline: Sequence[tuple[float, float]] = ()  # the front's staircase, sorted by x
    dense: tuple[float, float] | None = None
    note: str = ""  # a line under the plot, e.g. "no completed trials yet"
    y_inverted: bool = False  # a minimised task metric (mse): lower values drawn higher up


@dataclass(frozen=True)
class Axes:
    """Fitted limits; ``log_x`` for a log x axis (then the limits are positive)."""

    x_lo: float
    x_hi: float
    y_lo: float
    y_hi: float
    log_x: bool = False
    outside: int = field(default=0, compare=False)

    def inside(self, x: float, y: float) -> bool:
        return self.x_lo <= x <= self.x_hi and self.y_lo <= y <= self.y_hi


# --------------------------------------------------------------------------------------------
# axis fitting (shared with the PNG)
# --------------------------------------------------------------------------------------------


def _finite(values: Iterable[float]) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def use_log(values: Iterable[float]) -> bool:
    """A log axis when the positive values span more than :data:`LOG_SCALE_SPAN`."""
    positive = [v for v in _finite(values) if v > 0]
    return len(positive) >= 2 and max(positive) / min(positive) > LOG_SCALE_SPAN


def fit_axes(
    points: Sequence[tuple[float, float, str]],
    dense: tuple[float, float] | None = None,
    maximize: bool = True,
) -> Axes:
    """Limits fitted to the feasible points (``kind`` front/feasible) and the dense model.

    Infeasible points never widen the axes (they would squash the front); nor do feasible
    points that collapsed far below the front: y stops one front-span below the front's lowest
    point, as the PNG always did (above its highest for a minimised metric, ``maximize``
    False: there the collapsed points have the high values). With no feasible point the axes
    fit every point.
    """
    fit = [(x, y) for x, y, kind in points if kind != "infeasible"]
    if not fit:
        fit = [(x, y) for x, y, _ in points]
    if dense is not None:
        fit.append(dense)
    fit = [(x, y) for x, y in fit if math.isfinite(x) and math.isfinite(y)]
    if not fit:
        return Axes(0.0, 1.0, 0.0, 100.0)
    xs, ys = [x for x, _ in fit], [y for _, y in fit]
    log_x = use_log(xs) and min(xs) > 0
    front_y = [y for _, y, kind in points if kind == "front" and math.isfinite(y)]
    y_lo, y_hi = min(ys), max(ys)
    if front_y and maximize:
        span = max(y_hi - min(front_y), 1.0)
        y_lo = max(y_lo, min(front_y) - span)
    elif front_y:  # a minimised metric's span is in its own units (mse 0.4): no 1.0 floor
        span = max(max(front_y) - y_lo, abs(max(front_y)) * 0.01, 1e-12)
        y_hi = min(y_hi, max(front_y) + span)
    x_lo, x_hi = _padded(min(xs), max(xs), log_x)
    y_lo, y_hi = _padded(y_lo, y_hi, False)
    axes = Axes(x_lo, x_hi, y_lo, y_hi, log_x)
    outside = sum(1 for x, y, _ in points if not axes.inside(x, y))
    return Axes(x_lo, x_hi, y_lo, y_hi, log_x, outside)


def _padded(lo: float, hi: float, log: bool) -> tuple[float, float]:
    if log:
        a, b = _padded(math.log10(lo), math.log10(hi), False)
        return 10.0**a, 10.0**b
    if hi - lo <= 0:
        width = abs(hi) * 0.1 or 1.0
        return lo - width, hi + width
    pad = (hi - lo) * PAD
    return lo - pad, hi + pad


def ticks(lo: float, hi: float, log: bool = False, target: int = 6) -> list[float]:
    """Round tick values inside ``[lo, hi]``: 1-2-5 steps, or decades (and 2, 5) on a log axis."""
    if log:
        first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        steps = (1,) if last - first > 3 else (1, 2, 5)
        values = [m * 10.0**e for e in range(first, last + 1) for m in steps]
        return [v for v in values if lo <= v <= hi]
    raw = (hi - lo) / max(target, 1)
    if raw <= 0 or not math.isfinite(raw):
        return [lo]
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    start = math.ceil(lo / step) * step
    count = int(math.floor((hi - start) / step + 1e-9)) + 1
    return [round(start + i * step, 12) for i in range(max(count, 0))]


def tick_label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e6 or abs(value) < 1e-3:
        return f"{value:.3g}"
    return f"{value:,.6g}"


# --------------------------------------------------------------------------------------------
# the page
# --------------------------------------------------------------------------------------------


def page(panels: Sequence[Panel], tips: Sequence[str], heading: str = "Pareto front") -> str:
    """The whole HTML document. ``tips`` are trusted HTML (the caller escapes its values)."""
    if not panels:
        raise ValueError("page needs at least one panel")
    tips = list(tips)
    svgs = []
    for index, panel in enumerate(panels):
        dense_tip = None
        if panel.dense is not None:
            dx, dy = panel.dense
            dense_tip = len(tips)
            tips.append(f"<b>dense model</b><br>{html.escape(panel.x_label)}: {tick_label(dx)}"
                        f"<br>{html.escape(panel.y_label)}: {tick_label(dy)}")
        svgs.append(_svg(panel, index, dense_tip))
    switch = ""
    if len(panels) > 1:
        options = "".join(f'<option value="{i}">{html.escape(p.name)}</option>'
                          for i, p in enumerate(panels))
        switch = f'<label>view <select id="view">{options}</select></label>'
    tips_json = json.dumps(list(tips), ensure_ascii=False).replace("</", "<\\/")
    legend = "".join(
        f'<span><svg width="14" height="14">{mark}</svg>{text}</span>'
        for mark, text in (
            (_circle(7, 7, 5, FRONT_COLOR, 'stroke="#333"'), "front"),
            (_circle(7, 7, 3.5, FEASIBLE_COLOR, 'fill-opacity="0.7"'), "feasible"),
            (_cross(7, 7, 4), "infeasible"),
            (_star(7, 7, 6), "dense model"),
            (_triangle(7, 7, "down", INFEASIBLE_COLOR), "outside the axes (on the edge)"),
        )
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(heading)}</title>
<style>
body{{font:14px system-ui,sans-serif;margin:12px;color:#222}}
h1{{font-size:16px;margin:0 0 6px}} .bar{{display:flex;gap:18px;align-items:center;flex-wrap:wrap}}
.bar span{{display:inline-flex;gap:4px;align-items:center}} .panel{{max-width:{_W}px}}
svg.plot{{width:100%;height:auto;display:block}} .note{{color:#555;font-size:12px;margin:2px 0}}
#tip{{position:fixed;display:none;pointer-events:none;background:#fff;border:1px solid #888;
border-radius:4px;padding:6px 8px;font-size:12px;line-height:1.35;box-shadow:0 2px 6px #0003;
max-width:460px;z-index:9}}
</style></head><body>
<div class="bar">{switch}{legend}</div>
{''.join(svgs)}
<div id="tip"></div>
<script id="tips" type="application/json">{tips_json}</script>
<script>
(function(){{
var tips=JSON.parse(document.getElementById('tips').textContent),box=document.getElementById('tip');
document.addEventListener('mousemove',function(e){{
var t=e.target.closest&&e.target.closest('[data-t]');
if(!t){{box.style.display='none';return;}}
box.innerHTML=tips[+t.getAttribute('data-t')];box.style.display='block';
var x=e.clientX+14,y=e.clientY+14,r=box.getBoundingClientRect();
if(x+r.width>innerWidth)x=Math.max(0,e.clientX-r.width-14);
if(y+r.height>innerHeight)y=Math.max(0,innerHeight-r.height-4);
box.style.left=x+'px';box.style.top=y+'px';}});
var v=document.getElementById('view');
if(v)v.addEventListener('change',function(){{
document.querySelectorAll('.panel').forEach(function(p,i){{
p.style.display=i==v.value?'':'none';}});}});
}})();
</script>
</body></html>
"""


def _svg(panel: Panel, index: int, dense_tip: int | None = None) -> str:
    raw = [(p.x, p.y, p.kind) for p in panel.points]
    axes = fit_axes(raw, panel.dense, maximize=not panel.y_inverted)
    sx, sy = _scales(axes, panel.y_inverted)
    x0, x1, y0, y1 = _LEFT, _W - _RIGHT, _TOP, _H - _BOTTOM
    parts = [f'<rect x="{x0}" y="{y0}" width="{x1 - x0}" height="{y1 - y0}" fill="none" '
             'stroke="#999"/>']
    for value in ticks(axes.x_lo, axes.x_hi, axes.log_x):
        px = sx(value)
        parts.append(f'<line x1="{px:.1f}" y1="{y0}" x2="{px:.1f}" y2="{y1}" stroke="#eee"/>'
                     f'<text x="{px:.1f}" y="{y1 + 16}" text-anchor="middle">'
                     f'{tick_label(value)}</text>')
    for value in ticks(axes.y_lo, axes.y_hi):
        py = sy(value)
        parts.append(f'<line x1="{x0}" y1="{py:.1f}" x2="{x1}" y2="{py:.1f}" stroke="#eee"/>'
                     f'<text x="{x0 - 6}" y="{py + 4:.1f}" text-anchor="end">'
                     f'{tick_label(value)}</text>')
    parts.append(f'<text x="{(x0 + x1) / 2}" y="{_H - 12}" text-anchor="middle">'
                 f'{html.escape(panel.x_label)}{" (log)" if axes.log_x else ""}</text>')
    parts.append(f'<text transform="translate(16 {(y0 + y1) / 2}) rotate(-90)" '
                 f'text-anchor="middle">{html.escape(panel.y_label)}</text>')
    marks: dict[str, list[str]] = {"infeasible": [], "feasible": [], "front": [], "edge": []}
    labels: list[str] = []
    for point in panel.points:
        if not axes.inside(point.x, point.y):
            px, py, side = _edge(axes, sx, sy, point.x, point.y, panel.y_inverted)
            color = {"front": FRONT_COLOR, "feasible": FEASIBLE_COLOR}.get(point.kind,
                                                                          INFEASIBLE_COLOR)
            marks["edge"].append(_triangle(px, py, side, color, point.tip))
            continue
        px, py = sx(point.x), sy(point.y)
        if point.kind == "front":
            marks["front"].append(_circle(px, py, 5.5, FRONT_COLOR, 'stroke="#333"', point.tip))
            if point.label:
                labels.append(f'<text x="{px + 7:.1f}" y="{py - 7:.1f}" font-size="11" '
                              f'fill="#7a1414">{html.escape(point.label)}</text>')
        elif point.kind == "feasible":
            marks["feasible"].append(_circle(px, py, 4, FEASIBLE_COLOR, 'fill-opacity="0.65"',
                                             point.tip))
        else:
            marks["infeasible"].append(_cross(px, py, 4, point.tip))
    clip = f"clip{index}"
    body = [f'<clipPath id="{clip}"><rect x="{x0}" y="{y0}" width="{x1 - x0}" '
            f'height="{y1 - y0}"/></clipPath>']
    if panel.outline:
        steps = _staircase([(sx(x), sy(y)) for x, y in panel.outline])
        body.append(f'<polyline clip-path="url(#{clip})" points="{steps}" fill="none" '
                    f'stroke="{FRONT_COLOR}" stroke-width="2"/>')
    for kind in ("infeasible", "feasible", "front", "edge"):
        body.extend(marks[kind])
    if panel.dense is not None and axes.inside(*panel.dense):
        dx, dy = panel.dense
        body.append(f'<g{_tip(dense_tip)}>{_star(sx(dx), sy(dy), 9)}</g>')
    notes = [panel.note] if panel.note else []
    if axes.outside:
        notes.append(f"{axes.outside} trial(s) outside the axes (fitted to the feasible points): "
                     "drawn on the edge as triangles pointing outwards")
    note_html = "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes)
    hidden = ' style="display:none"' if index else ""
    return (f'<div class="panel"{hidden}><h1>{html.escape(panel.title)}</h1>'
            f'<svg class="plot" viewBox="0 0 {_W} {_H}" font-size="12" '
            f'data-xscale="{"log" if axes.log_x else "linear"}" '
            f'data-yaxis="{"inverted" if panel.y_inverted else "normal"}" '
            f'data-points="{len(panel.points)}" xmlns="http://www.w3.org/2000/svg">'
            f'{"".join(parts)}{"".join(body)}{"".join(labels)}</svg>{note_html}</div>\n')


def _scales(axes: Axes, y_inverted: bool = False):
    x0, x1, y0, y1 = _LEFT, _W - _RIGHT, _TOP, _H - _BOTTOM
    if axes.log_x:
        lo, hi = math.log10(axes.x_lo), math.log10(axes.x_hi)

        def sx(v: float) -> float:
            return x0 + (math.log10(max(v, 1e-300)) - lo) / (hi - lo) * (x1 - x0)
    else:
        def sx(v: float) -> float:
            return x0 + (v - axes.x_lo) / (axes.x_hi - axes.x_lo) * (x1 - x0)

    def sy(v: float) -> float:
        fraction = (v - axes.y_lo) / (axes.y_hi - axes.y_lo)
        return y0 + fraction * (y1 - y0) if y_inverted else y1 - fraction * (y1 - y0)

    return sx, sy


def _edge(axes: Axes, sx, sy, x: float, y: float,
          y_inverted: bool = False) -> tuple[float, float, str]:
    """Where an outside point meets the frame, and which way it lies (for the triangle)."""
    cx = min(max(x, axes.x_lo), axes.x_hi)
    cy = min(max(y, axes.y_lo), axes.y_hi)
    if y < axes.y_lo:
        side = "up" if y_inverted else "down"
    elif y > axes.y_hi:
        side = "down" if y_inverted else "up"
    elif x < axes.x_lo:
        side = "left"
    else:
        side = "right"
    return sx(cx), sy(cy), side


def _staircase(points: Sequence[tuple[float, float]]) -> str:
    """Horizontal then vertical between consecutive front points (plotly's "hv")."""
    coords = [points[0]]
    for (_, y_prev), (x, y) in zip(points, points[1:]):
        coords.extend([(x, y_prev), (x, y)])
    return " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)


def _tip(tip: int | None) -> str:
    return "" if tip is None else f' data-t="{int(tip)}"'


def _circle(x: float, y: float, r: float, color: str, extra: str = "",
            tip: int | None = None) -> str:
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" fill="{color}" {extra}{_tip(tip)}/>'


def _cross(x: float, y: float, r: float, tip: int | None = None) -> str:
    return (f'<path d="M{x - r:.1f} {y - r:.1f}L{x + r:.1f} {y + r:.1f}M{x - r:.1f} {y + r:.1f}'
            f'L{x + r:.1f} {y - r:.1f}" stroke="{INFEASIBLE_COLOR}" stroke-width="2"{_tip(tip)}/>')


def _triangle(x: float, y: float, side: str, color: str, tip: int | None = None) -> str:
    r = 6.0
    corners = {
        "down": [(x - r, y - r), (x + r, y - r), (x, y)],
        "up": [(x - r, y + r), (x + r, y + r), (x, y)],
        "left": [(x + r, y - r), (x + r, y + r), (x, y)],
        "right": [(x - r, y - r), (x - r, y + r), (x, y)],
    }[side]
    points = " ".join(f"{a:.1f},{b:.1f}" for a, b in corners)
    return (f'<polygon points="{points}" fill="#fff" stroke="{color}" stroke-width="1.5"'
            f'{_tip(tip)}/>')


def _star(x: float, y: float, r: float) -> str:
    corners = []
    for k in range(10):
        radius = r if k % 2 == 0 else r * 0.45
        angle = math.pi / 2 + k * math.pi / 5
        corners.append(f"{x + radius * math.cos(angle):.1f},{y - radius * math.sin(angle):.1f}")
    return f'<polygon points="{" ".join(corners)}" fill="{DENSE_COLOR}" stroke="#222"/>'
