"""Figures from stored records only (matplotlib, Agg), ready for a paper: PNG, PDF and PGF.

Each figure is written at two widths, double column (6.75 in: ``<name>.png|pdf|pgf``) and single
column (3.25 in: ``<name>-single.*``), with fonts for an 8-9 pt paper (``style="paper"``) or larger
for slides (``style="slides"``). Every method keeps one colour, marker and line pattern in every
figure (:mod:`harness.reporting.style`); panels are titled from the model's card fields ("DeiT-S · CIFAR-10 ·
200 images"), one legend sits below the panels, outside the data. Written by :func:`write_plots`
under ``<reports>/figures/``:

- ``accuracy_vs_gmacs``: top-1 against analytic GMACs, one panel per model, with ``none`` (a star),
  the reference methods (``resolution``, black) and at most :data:`MAX_SERIES` series in all by
  default (the methods with the highest mean top-1; ``methods`` picks others); paired controls
  (``random@X``) are left to ``controls``. Each point carries its 95 % Wilson interval; the series
  are dodged sideways by a few points (display space, the data stay where they are) so intervals
  at one GMACs target can be told apart. Cells off their GMACs target are hollow at the GMACs they
  reached;
- ``matched_budget``: a forest plot, one panel per model and budget: each method's top-1 with its
  95 % interval, ``none``'s top-1 as a line with its interval shaded; ``*``: the change against
  ``none`` is significant (exact McNemar, Holm-adjusted within the model and budget);
- ``controls`` (where a control is stored): each method minus its paired control (``random@method``: random tokens at the
  method's own schedule), points, with Newcombe's 95 % interval for paired proportions; ``*``:
  significant after Holm adjustment over all the control tests;
- ``speedup_vs_ideal``: measured speed-up (the median of rounds interleaved with the unpatched model
  in one process, its quartiles as the bar) against the ideal one (baseline GMACs / GMACs), with
  y = x; never absolute img/s, which drifts between cells timed at different moments;
- ``tokens_per_block``: small multiples, one panel per method: its schedule (tokens after each
  block) at one budget, one line pattern per model, ``none``'s in grey.

Only each method's newest version is drawn (:func:`harness.reporting.report.current`).
"""
from __future__ import annotations

import logging
import textwrap
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional, Sequence

from harness.reporting import style as st
from harness.errors import HarnessError
from harness.sweep.store import ResultStore
from harness.reporting.report import (BASELINE, MEASURED, REFERENCE_SUFFIX, _loader, _num, baseline_of, budget_order, controls,
                            current, environments, fine_tuned, is_reference, load_frame, method_label, model_rows,
                            scored_envs, speedup_of, top1_interval)

log = logging.getLogger(__name__)

KNOWN = st.KNOWN
# series in one accuracy panel by default, none and the reference methods included
MAX_SERIES = 8
# sideways offset between two series' points, in typographic points (display space, not data)
DODGE_PT = 2.6
# fonts and widths (inches) per style: "paper" for an 8-9 pt two-column paper, "slides" for a talk
STYLES = {"paper": {"font": 8, "small": 7, "single": 3.25, "double": 6.75, "marker": 4.0, "line": 1.0},
          "slides": {"font": 14, "small": 12, "single": 5.0, "double": 10.0, "marker": 6.5, "line": 1.8}}
WIDTHS = {"double": "", "single": "-single"}  # file-name suffix per width
FORMATS = ("png", "pdf", "pgf")
IDEAL = "y = x (ideal)"
OFF_TARGET = "off GMACs target (hollow)"
SIGNIFICANT = "* significant (Holm-adjusted)"
GUIDES = (IDEAL, OFF_TARGET, SIGNIFICANT)  # legend entries that are not methods, listed last
FIGURES = ("accuracy_vs_gmacs", "matched_budget", "controls", "speedup_vs_ideal", "tokens_per_block")


def method_style(name: str) -> dict:
    """Colour, marker, marker face and line pattern of a method label (:func:`harness.reporting.style.method_style`);
    a reference method (``Method.baseline``) is black."""
    return st.method_style(name, reference=name != BASELINE and is_reference(st.base_method(name)))


def _method_of(label: str) -> str:
    """The method a legend label names ("resolution (baseline)" -> "resolution")."""
    return label[: -len(REFERENCE_SUFFIX)] if label.endswith(REFERENCE_SUFFIX) else label


def method_order(names) -> list[str]:
    """Legend order: the baseline, the reference methods, built-ins in their fixed order (each followed
    by its variants and its control), then the rest by name. ``names`` may be legend labels."""
    def key(n):
        m = st.base_method(_method_of(n))
        lead = m.partition("@")[2] or m
        return n != BASELINE, not is_reference(lead), st.known_order(lead), lead, "@" in m, n

    return sorted(set(names), key=key)


@contextmanager
def paper_style(name: str = "paper"):
    """rcParams for a paper's figures (or ``slides``): small type, thin lines, no top/right spines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = STYLES[name]
    rc = {"font.size": s["font"], "axes.titlesize": s["font"], "axes.labelsize": s["font"],
          "xtick.labelsize": s["small"], "ytick.labelsize": s["small"], "legend.fontsize": s["small"],
          "axes.linewidth": 0.6, "lines.linewidth": s["line"], "lines.markersize": s["marker"],
          "axes.spines.top": False, "axes.spines.right": False, "grid.linewidth": 0.4, "grid.alpha": 0.5,
          "xtick.major.width": 0.6, "ytick.major.width": 0.6, "savefig.dpi": 200, "pdf.fonttype": 42,
          "font.family": "DejaVu Sans", "svg.hashsalt": "harness", "path.simplify": False}
    with plt.rc_context(rc):
        yield plt


# --- what is drawn ---------------------------------------------------------------------------------


def env_title(env: dict, group) -> str:
    """A panel's title from the card fields its records carry: ``DeiT-S · CIFAR-10 · 200 images``,
    with what tells the model's environments apart when it ran in several."""
    cur = current(group)
    measured = cur[cur["status"].isin(MEASURED)]
    archs = [a for a in (measured["arch"] if "arch" in measured else []) if isinstance(a, str)]
    n = measured["n_images"].map(_num).dropna()
    extra = env["label"][len(env["model"]):].strip(" ()") if env["label"] != env["model"] else ""
    if not archs:  # records that name no architecture: the model's own name
        return f"{env['model']}" + (f" ({extra})" if extra else "")
    return st.model_title(archs[0], env["data"], int(n.max()) if len(n) else None, extra)


def _methods(group) -> list[str]:
    cur = current(group)
    return method_order(m for m in cur.loc[cur["status"].isin(MEASURED), "method"] if m != BASELINE)


def shown_methods(envs, methods: Optional[Sequence[str]] = None, limit: int = MAX_SERIES) -> list[str]:
    """The methods of the accuracy figure: ``methods`` as given (those stored), else the reference
    methods and then the highest mean top-1 over every panel's cells, up to ``limit`` series with
    ``none``. Paired controls (``random@X``) never: they have their own figure."""
    stored = {m for _, g in envs for m in _methods(g)}
    if methods:
        return method_order(m for m in methods if m in stored)
    candidates = [m for m in stored if not st.is_control(m)]
    refs = [m for m in candidates if is_reference(st.base_method(m))]
    score = {m: _mean_top1(envs, m) for m in candidates if m not in refs}
    ranked = sorted(score, key=lambda m: (-score[m], m))
    return method_order(refs + ranked[:max(0, limit - 1 - len(refs))])


def _mean_top1(envs, method: str) -> float:
    vals = [_num(r["top1"]) for _, g in envs for r in _cells(g, method) if r["status"] == "ok"]
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else -1.0


def _cells(group, method: str) -> list[dict]:
    """``method``'s measured cells (ok and off target) at its newest version in one environment."""
    cur = current(group)
    rows = cur[cur["status"].isin(MEASURED) & (cur["method"] == method)]
    return [r.to_dict() for _, r in rows.iterrows()]


# --- drawing helpers -------------------------------------------------------------------------------


def _grid(plt, n: int, width: float, cols: int, panel_h: float, sharey: bool = False):
    cols = max(1, min(n, cols))
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width, panel_h * rows), squeeze=False, sharey=sharey)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _dodge(ax, i: int, k: int):
    """The data transform shifted sideways for series ``i`` of ``k``: points at one x stay apart."""
    from matplotlib import transforms

    return transforms.offset_copy(ax.transData, fig=ax.figure, x=(i - (k - 1) / 2) * DODGE_PT, units="points")


def _line(ax, pts, name: str, anchor: Optional[tuple[float, float]] = None, hollow=(), **extra) -> None:
    """``name``'s points joined by a line; ``anchor`` (the baseline) joins the line without a marker,
    the points in ``hollow`` (off target) get an unfilled one."""
    if not pts:
        return
    style = method_style(name)
    pts = sorted(pts + ([anchor] if anchor else []))
    marked = [i for i, p in enumerate(pts) if (anchor is None or p != anchor) and p not in hollow]
    xs, ys = zip(*pts)
    extra.setdefault("markevery", marked)
    ax.plot(xs, ys, label=method_label(name), color=style["color"], marker=style["marker"],
            linestyle=style["linestyle"], markerfacecolor=style["markerfacecolor"], markeredgecolor=style["color"],
            **extra)
    if hollow:
        hx, hy = zip(*hollow)
        ax.plot(hx, hy, color=style["color"], marker=style["marker"], linestyle="none", markerfacecolor="white",
                markeredgecolor=style["color"], label="_off_target", zorder=extra.get("zorder", 2) + 0.1,
                **({"transform": extra["transform"]} if "transform" in extra else {}))
        # one legend entry says what hollow means, whichever method it is
        ax.plot([], [], color="#444444", marker="o", linestyle="none", markerfacecolor="white", label=OFF_TARGET)


def _error_bars(ax, pts, name: str, horizontal: bool = False, **extra) -> None:
    """Bars from (x, y, low, high, ...) points (vertical; ``horizontal``: (y, x, low, high)); points
    without an interval get none."""
    pts = [p for p in pts if p[2] is not None and p[3] is not None]
    if not pts:
        return
    xs, ys, lows, highs = zip(*(p[:4] for p in pts))
    err = [[y - lo for y, lo in zip(ys, lows)], [hi - y for y, hi in zip(ys, highs)]]
    args = {"xerr": err} if horizontal else {"yerr": err}
    ax.errorbar(ys if horizontal else xs, xs if horizontal else ys, **args, fmt="none",
                ecolor=method_style(name)["color"], elinewidth=0.7, capsize=1.5, alpha=0.8, label="_interval",
                zorder=1.5, **extra)


def _title(ax, text: str, width_in: float) -> None:
    ax.set_title("\n".join(textwrap.fill(line, max(24, int(14 * width_in))) for line in text.split("\n")))


def _baseline_marker(ax, x: float, y: Optional[float], *interval, **extra) -> None:
    """The baseline as a star at (x, y) with a dotted line at its accuracy; (1, 1) when y is None.
    ``interval`` (low, high) adds its error bar."""
    style = method_style(BASELINE)
    if y is None:
        x = y = 1.0
    else:
        ax.axhline(y, color=style["color"], linewidth=0.6, linestyle=":", zorder=1)
        _error_bars(ax, [(x, y, *interval)], BASELINE, **extra)
    ax.plot([x], [y], marker=style["marker"], color=style["color"], markersize=7, linestyle="none",
            label=BASELINE, zorder=5, **extra)


def _legend(fig, axes, ncol: int) -> None:
    """One legend for all panels, below them, in the fixed method order."""
    handles = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if not lab.startswith("_"):
                handles.setdefault(lab, h)
    guides = [n for n in handles if n in GUIDES or n.startswith(f"{BASELINE}:")]
    order = method_order(n for n in handles if n not in guides) + [g for g in GUIDES if g in handles] + \
        sorted(g for g in guides if g not in GUIDES)
    fig.tight_layout(h_pad=1.0, w_pad=1.2)
    if order:
        fig.legend([handles[n] for n in order], order, loc="upper center", ncol=min(len(order), ncol),
                   frameon=False, bbox_to_anchor=(0.5, 0.0), handlelength=2.4, columnspacing=1.0)


def _panel_columns(width: float, panels: int) -> int:
    """One panel per model side by side at double-column width (two at most), stacked at single."""
    return max(1, min(panels, 1 if width < 5 else 2))


def _legend_columns(width: float) -> int:
    return max(2, int(width / 1.4))


# --- the figures -----------------------------------------------------------------------------------


def _accuracy_points(group, method: str) -> list[tuple]:
    """(GMACs, top-1 %, low, high, off target) of ``method``'s measured cells, by GMACs."""
    pts = [(_num(r["gmacs"]), 100 * _num(r["top1"]), *top1_interval(r), r["status"] == "off_target")
           for r in _cells(group, method) if _num(r["top1"]) is not None]
    return sorted((p for p in pts if p[0] is not None), key=lambda p: p[:2])


def _baseline_point(group) -> Optional[tuple]:
    """(GMACs, top-1 %, low, high) of the environment's baseline, or None."""
    base = baseline_of(group)
    if base is None or _num(base.get("top1")) is None or _num(base.get("gmacs")) is None:
        return None
    return (_num(base["gmacs"]), 100 * _num(base["top1"]), *top1_interval(base))


def accuracy_vs_gmacs(plt, envs, methods: Optional[Sequence[str]] = None, width: float = STYLES["paper"]["double"]):
    """Top-1 against GMACs, one panel per model (see the module docstring)."""
    shown, cols = shown_methods(envs, methods), _panel_columns(width, len(envs))
    fig, axes = _grid(plt, len(envs), width, cols, 2.3 if width < 5 else 2.6)
    for ax, (env, group) in zip(axes, envs):
        base = _baseline_point(group)
        drawn = [m for m in shown if m in _methods(group)]
        extent = [base[:2]] if base else []
        for i, m in enumerate(drawn):
            tr = _dodge(ax, i, len(drawn))
            pts = _accuracy_points(group, m)
            extent += [(p[0], y) for p in pts for y in p[1:4] if y is not None]
            # every method at its identity knob is the baseline, so its curve starts there
            _line(ax, [p[:2] for p in pts], m, anchor=base[:2] if base else None,
                  hollow=[p[:2] for p in pts if p[4]], transform=tr)
            _error_bars(ax, pts, m, transform=tr)
        if base:
            _baseline_marker(ax, *base)
        # dodged artists do not move the data limits: the points and interval ends set them
        ax.update_datalim(extent)
        ax.margins(x=0.05)  # room for the outermost dodged series
        ax.autoscale_view()
        _title(ax, env_title(env, group), width / cols)
        ax.set_ylabel("top-1 (%)")
        ax.set_xlabel("GMACs")
        ax.grid(True)
    _legend(fig, axes, _legend_columns(width))
    return fig


def _budgets(group) -> list[str]:
    cur = current(group)
    return sorted({str(b) for b in cur.loc[cur["status"] == "ok", "budget"] if str(b) != "baseline"},
                  key=budget_order)


def _dot_panel(ax, items: list[tuple], reference: Optional[tuple]) -> None:
    """Methods as rows (first at the top): each a point with a horizontal interval, ``*`` where
    significant; ``reference`` (x, low, high) a vertical line with its interval shaded."""
    n = len(items)
    for y, (method, x, low, high, significant) in zip(range(n - 1, -1, -1), items):
        style = method_style(method)
        ax.plot([x], [y], marker=style["marker"], color=style["color"], markerfacecolor=style["markerfacecolor"],
                linestyle="none", label=method_label(method), zorder=3)
        _error_bars(ax, [(y, x, low, high)], method, horizontal=True)
        if significant:
            ax.annotate("*", (high if high is not None else x, y), xytext=(2, -3), textcoords="offset points",
                        fontweight="bold")
    if reference is not None:
        x, low, high = reference
        ax.axvline(x, color="black", linewidth=0.7, linestyle=":", zorder=1)
        if low is not None and high is not None:
            ax.axvspan(low, high, color="#000000", alpha=0.07, linewidth=0, zorder=0)
    ax.set_yticks(range(n - 1, -1, -1), [method_label(m) for m, *_ in items])
    ax.set_ylim(-0.7, n - 0.3)
    ax.grid(True, axis="x")


def _dot_figure(plt, panels: list[tuple[str, list[tuple], Optional[tuple]]], xlabel: str, width: float,
                reference_label: str = ""):
    """A forest of panels ``(title, items, reference)`` sharing one legend; a panel's method names
    show on the first panel of each row only when every panel lists the same methods."""
    import matplotlib

    # labels and titles take their width at any size: fewer columns for larger (slides) type
    cols = (2 if width < 5 else 3) - (matplotlib.rcParams["font.size"] > 10)
    rows_max = max((len(items) for _, items, _ in panels), default=1)
    # a panel: two title lines and a two-line axis label, then a row per method
    fig, axes = _grid(plt, len(panels), width, cols, max(1.6, 0.8 + 0.16 * rows_max))
    for ax, (title, items, ref) in zip(axes, panels):
        _dot_panel(ax, items, ref)
        _title(ax, title, width / cols)
    if any(any(i[4] for i in items) for _, items, _ in panels):
        axes[0].plot([], [], linestyle="none", marker="$*$", color="black", label=SIGNIFICANT)
    if reference_label:
        axes[0].fill_between([], [], color="#000000", alpha=0.07, linewidth=0, label=reference_label)
    for ax in axes[-cols:]:
        ax.set_xlabel(xlabel)
    _legend(fig, axes, _legend_columns(width))
    return fig


def _panel_title(title: str, budget: str) -> str:
    """``DeiT-S · budget 0.7`` over ``CIFAR-10 · 200 images``: two short lines for a narrow panel."""
    model, _, rest = title.partition(" · ")
    return f"{model} · budget {budget}" + (f"\n{rest}" if rest else "")


def matched_budget(plt, envs, load: Optional[Callable] = None, width: float = STYLES["paper"]["double"]):
    """Forest plot per model and budget: top-1 [95 %] of each method, ``none``'s line and band, ``*``
    where the change against ``none`` is significant after Holm adjustment."""
    load = load or _loader()
    panels = []
    for env, group in envs:
        rows = model_rows(group, load)
        base = next((r for r in rows if r["method"] == BASELINE), None)
        ref = (base["top1"], base["top1_ci_low"], base["top1_ci_high"]) if base and base["top1"] is not None else None
        for budget in _budgets(group):
            here = {r["method"]: r for r in rows if r["budget"] == budget and r["top1"] is not None}
            items = [(m, here[m]["top1"], here[m]["top1_ci_low"], here[m]["top1_ci_high"], bool(here[m]["significant"]))
                     for m in method_order(here) if not st.is_control(m)]
            panels.append((_panel_title(env_title(env, group), budget), items, ref))
    return _dot_figure(plt, panels, "top-1 (%)\n[95 % Wilson]", width,
                       f"{BASELINE}: top-1 (dotted), 95 % interval (band)")


def controls_figure(plt, envs, load: Optional[Callable] = None, width: float = STYLES["paper"]["double"]):
    """Each method minus its random control per model and budget, Newcombe's paired 95 % interval,
    ``*`` where significant after Holm adjustment over all control tests; 0 dotted. None when no
    method has its control stored."""
    rows = controls(envs, load)
    titles = {e["label"]: env_title(e, g) for e, g in envs}
    panels = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for budget in sorted({r["budget"] for r in rows if r["model"] == model}, key=budget_order):
            here = {r["method"]: r for r in rows if (r["model"], r["budget"]) == (model, budget) and r["d_top1"] is not None}
            items = [(m, here[m]["d_top1"], here[m]["d_ci_low"], here[m]["d_ci_high"], bool(here[m]["significant"]))
                     for m in method_order(here)]
            panels.append((_panel_title(titles.get(model, model), budget), items, (0.0, None, None)))
    if not panels:
        return None
    return _dot_figure(plt, panels, "top-1 − random@method\n(points, 95 % Newcombe)", width)


def _speedup_points(group, method: str, base: Optional[dict]) -> list[tuple]:
    """(ideal, measured speed-up, q1, q3, off target) of ``method``'s measured cells timed interleaved."""
    pts = []
    for r in _cells(group, method):
        gmacs, base_gmacs = _num(r["gmacs"]), _num(r["gmacs_baseline"])
        s = speedup_of(r, base)
        if gmacs and base_gmacs and s["speedup"] and s["interleaved"]:
            pts.append((base_gmacs / gmacs, s["speedup"], s["speedup_q1"], s["speedup_q3"], r["status"] == "off_target"))
    return sorted(pts, key=lambda p: p[:2])


def speedup_vs_ideal(plt, envs, methods: Optional[Sequence[str]] = None, width: float = STYLES["paper"]["double"]):
    """Interleaved speed-up [quartiles] against the ideal one, y = x dashed, one panel per environment."""
    shown, cols = shown_methods(envs, methods), _panel_columns(width, len(envs))
    fig, axes = _grid(plt, len(envs), width, cols, 2.3 if width < 5 else 2.6)
    for ax, (env, group) in zip(axes, envs):
        base, top = baseline_of(group), 1.0
        for m in [m for m in shown if m in _methods(group)]:
            pts = _speedup_points(group, m, base)
            _line(ax, [p[:2] for p in pts], m, anchor=(1.0, 1.0), hollow=[p[:2] for p in pts if p[4]])
            _error_bars(ax, pts, m)
            top = max([top] + [max(p[0], p[3] or p[1]) for p in pts])
        if base is not None:
            _baseline_marker(ax, 1.0, None)
        end = 1 + (top - 1) * 1.08
        ax.plot([1, end], [1, end], color="#444444", linestyle="--", linewidth=0.7, zorder=0, label=IDEAL)
        _title(ax, f"{env_title(env, group)} · {env['device_short']}, {env['dtype']}", width / cols)
        ax.set_xlabel("ideal speed-up (GMACs ratio)")
        ax.set_ylabel("speed-up, interleaved")
        ax.grid(True)
    _legend(fig, axes, _legend_columns(width))
    return fig


def default_budget(envs) -> Optional[str]:
    """The middle budget of those stored (0.7 of 0.9/0.7/0.5), for the schedule plot."""
    budgets = sorted({b for _, g in envs for b in _budgets(g)}, key=budget_order)
    return budgets[len(budgets) // 2] if budgets else None


MODEL_LINES = ("-", "--", ":", "-.")  # one pattern per model in the schedule panels


def _schedules(envs, budget: str) -> dict[str, list[tuple[int, list]]]:
    """method -> [(environment index, tokens after each block)] of the ok cells at ``budget``."""
    out: dict[str, list[tuple[int, list]]] = {}
    for i, (_, group) in enumerate(envs):
        ok = current(group)
        ok = ok[(ok["status"] == "ok") & (ok["budget"].astype(str) == str(budget))]
        for m, sched in zip(ok["method"], ok["tokens_per_block"]):
            if isinstance(sched, list) and sched and m != BASELINE and not st.is_control(m):
                out.setdefault(m, []).append((i, sched))
    return out


def tokens_per_block(plt, envs, budget: Optional[str] = None, width: float = STYLES["paper"]["double"]):
    """Small multiples: one panel per method, its schedule at ``budget`` per model, ``none``'s grey."""
    budget = budget or default_budget(envs)
    scheds = _schedules(envs, budget) if budget else {}
    names = method_order(scheds)
    cols = 3 if width < 5 else 5
    fig, axes = _grid(plt, max(1, len(names)), width, cols, 1.25, sharey=True)
    full = max((max(s) for v in scheds.values() for _, s in v), default=1)
    for ax, m in zip(axes, names):
        style = method_style(m)
        ax.axhline(full, color="#999999", linewidth=0.7, linestyle=":", zorder=0)
        for i, sched in scheds[m]:
            ax.plot(range(1, len(sched) + 1), sched, color=style["color"], drawstyle="steps-mid",
                    linestyle=MODEL_LINES[i % len(MODEL_LINES)], linewidth=1.0)
        ax.set_title(method_label(m), color="black")
        ax.set_ylim(0, full * 1.08)
        ax.grid(True, axis="y")
    for i, (env, group) in enumerate(envs):
        if any(j == i for v in scheds.values() for j, _ in v):
            axes[0].plot([], [], color="black", linestyle=MODEL_LINES[i % len(MODEL_LINES)], label=env_title(env, group))
    axes[0].plot([], [], color="#999999", linestyle=":", label=f"{BASELINE}: every token")
    for ax in axes[-cols:]:
        ax.set_xlabel("block")
    for ax in axes[::cols]:
        ax.set_ylabel("tokens after")
    fig.suptitle(f"tokens after each block at budget {budget}", y=1.0)
    _legend(fig, axes, 2)
    return fig


# --- files ----------------------------------------------------------------------------------------


@contextmanager
def _pgf_text_metrics():
    """Text measured as Agg measures it while a PGF file is written: matplotlib's PGF backend asks a
    LaTeX process for every string's size, and a report must not need TeX installed. The PGF still
    typesets its text with the document's fonts; only the layout's spacing comes from DejaVu Sans."""
    from matplotlib.backends import backend_pgf
    from matplotlib.backends.backend_agg import RendererAgg

    original = backend_pgf.RendererPgf.get_text_width_height_descent

    def measure(self, s, prop, ismath):
        return RendererAgg(1, 1, self.dpi).get_text_width_height_descent(s, prop, ismath)

    backend_pgf.RendererPgf.get_text_width_height_descent = measure
    try:
        yield
    finally:
        backend_pgf.RendererPgf.get_text_width_height_descent = original


def save(fig, out_dir: Path, name: str, formats: tuple[str, ...] = FORMATS) -> list[Path]:
    """Write ``name``.png, .pdf and .pgf (or ``formats``) under ``out_dir``; return the paths.

    No dates in the files: regenerating unchanged figures leaves them byte for byte the same."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.{ext}" for ext in formats]
    for p in paths:
        meta = {"CreationDate": None} if p.suffix == ".pdf" else None
        if p.suffix == ".pgf":
            with _pgf_text_metrics():
                fig.savefig(p, bbox_inches="tight", pad_inches=0.02)
        else:
            fig.savefig(p, bbox_inches="tight", pad_inches=0.02, metadata=meta)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return paths


def _check_methods(envs, methods: Optional[Sequence[str]]) -> None:
    """A ``methods`` name no stored record has is one clear error, naming the ones there are."""
    stored = sorted({m for _, g in envs for m in _methods(g)})
    missing = [m for m in methods or () if m not in stored]
    if missing:
        raise HarnessError(f"--methods {','.join(missing)}: not among the stored methods ({', '.join(stored)})")


def write_plots(results_dir: Path, reports_dir: Path, budget: Optional[str] = None,
                methods: Optional[Sequence[str]] = None, style: str = "paper",
                widths: Sequence[str] = tuple(WIDTHS)) -> list[Path]:
    """Every figure of the module docstring, from stored records, under ``<reports_dir>/figures``.

    Args:
        results_dir: where the records are (``<results_dir>/records/*.json``).
        reports_dir: the reports directory; figures go to its ``figures/``.
        budget: the budget of the tokens-per-block plot (default: the middle stored budget).
        methods: the accuracy and speed figures' methods (default: at most :data:`MAX_SERIES` series).
        style: ``paper`` (8 pt type) or ``slides``.
        widths: ``double`` (``<name>.*``) and/or ``single`` (``<name>-single.*``).

    Returns:
        The paths written.
    """
    if style not in STYLES:
        raise ValueError(f"unknown figure style {style!r}: choose from {', '.join(STYLES)}")
    df = load_frame(results_dir)
    envs = environments(df)
    _check_methods(envs, methods)
    scored, load, out, written = scored_envs(envs), _loader(), Path(reports_dir) / "figures", []
    with paper_style(style) as plt:
        for w in widths:
            inches = STYLES[style][w]
            drawn = [("accuracy_vs_gmacs", scored, lambda: accuracy_vs_gmacs(plt, scored, methods, inches)),
                     ("matched_budget", scored, lambda: matched_budget(plt, scored, load, inches)),
                     ("controls", scored, lambda: controls_figure(plt, scored, load, inches)),
                     ("speedup_vs_ideal", envs, lambda: speedup_vs_ideal(plt, envs, methods, inches)),
                     ("tokens_per_block", envs, lambda: tokens_per_block(plt, envs, budget, inches))]
            for name, shown, draw in drawn:
                fig = draw() if shown else None
                if fig is not None:
                    written += save(fig, out, name + WIDTHS[w])
    written += _training_curves(df, results_dir, out)
    log.info("wrote %d figure files to %s", len(written), out)
    return written


def _training_curves(df, results_dir: Path, out: Path) -> list[Path]:
    """The fine-tunes' loss and learning-rate curves, where any record was fine-tuned."""
    if not fine_tuned(df):
        return []
    from harness.reporting.protocol_report import plot_training_curves

    return plot_training_curves(ResultStore(results_dir).load_all(), Path(results_dir), out)
