"""Figures from stored records only (matplotlib, Agg): PNG for the README, PDF for papers.

Every figure has one panel per model (environment), 3.3 in wide (a paper's column) with 8 pt text,
and draws each method with the same colour and marker (:func:`method_style`). Written by
:func:`write_plots` under ``<reports>/figures/``:

- ``accuracy_vs_gmacs``: top-1 against analytic GMACs, one line per method, the baseline a star;
  a reference method (``Method.baseline``: ``resolution``, the model at a lower input resolution)
  is a black dashed line labelled "<name> (baseline)" in every figure, the line the others must beat;
- ``accuracy_vs_throughput``: top-1 against measured img/s, with the Pareto front of all cells;
- ``speedup_vs_ideal``: measured speed-up against the ideal one (baseline GMACs / GMACs), y = x dashed;
- ``tokens_per_block``: the stored schedules (tokens leaving each block) at one budget.

Top-1 points carry their 95 % Wilson interval as an error bar, interleaved speed-ups their quartiles.
Only each method's newest version is drawn; cells off their GMACs target are drawn hollow at the
GMACs they achieved (they are points of the curve, not of their budget).
"""
from __future__ import annotations

import hashlib
import logging
import textwrap
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from harness.report import (BASELINE, MEASURED, REFERENCE_SUFFIX, _num, base_method, baseline_of, budget_order,
                            current, environments, is_reference, load_frame, method_label, scored_envs, speedup_of,
                            top1_interval)

log = logging.getLogger(__name__)

# Fixed styles for the built-in methods (Okabe-Ito colours: distinct for colour-blind readers and in grey).
KNOWN = {
    "none": ("#000000", "*"),
    "random": ("#7f7f7f", "x"),
    "tome": ("#0072B2", "o"),
    "evit": ("#E69F00", "s"),
    "topk": ("#009E73", "^"),
    "diffrate": ("#D55E00", "D"),
    "resolution": ("#000000", "P"),
    "tofu": ("#56B4E9", "v"),
    "pitome": ("#1f3b73", "<"),
    "mctf": ("#CC79A7", "h"),
    "ppt": ("#bcbd22", "p"),
    "dct": ("#8c564b", "X"),
    "atc": ("#17becf", ">"),
    "zerotprune": ("#9467bd", "d"),
}
# a reference method's line (Method.baseline): black and dashed, whatever its marker
REFERENCE = {"color": "#000000", "linestyle": "--"}
# Unknown names hash into these (none of the colours above, and unused markers).
SPARE_COLORS = ("#e41a1c", "#984ea3", "#ff7f00", "#a65628", "#f781bf", "#999933", "#882255", "#44AA99")
SPARE_MARKERS = ("v", "P", "X", "<", ">", "h", "p", "d")
PANEL_W, PANEL_H = 3.3, 2.5
PARETO = "Pareto front"
IDEAL = "y = x (ideal)"
OFF_TARGET = "off GMACs target (hollow)"
GUIDES = (PARETO, IDEAL, OFF_TARGET)  # legend entries that are not methods, listed last
FIGURES = ("accuracy_vs_gmacs", "accuracy_vs_throughput", "speedup_vs_ideal", "tokens_per_block")


def method_style(name: str) -> dict:
    """Colour, marker and line of ``name``: fixed for built-ins, a stable hash for any other name.

    ``follower@leader`` (random at another method's schedule) takes the leader's colour, the
    follower's marker unfilled and a dashed line, so it reads as "that schedule, other tokens". A
    variant (``random[seed=1]``, one of a method's configurations) keeps its method's marker, in a
    colour of its own and dotted, so two configurations never share a line's look.
    """
    if base_method(name) != name:
        h = int(hashlib.sha1(name.encode()).hexdigest(), 16)
        return {**method_style(base_method(name)), "color": SPARE_COLORS[h % len(SPARE_COLORS)], "linestyle": ":",
                "markerfacecolor": "white"}
    follower, sep, leader = name.partition("@")
    if sep:
        lead, fol = method_style(leader), method_style(follower)
        return {"color": lead["color"], "marker": fol["marker"], "linestyle": "--", "markerfacecolor": "white"}
    if name in KNOWN:
        color, marker = KNOWN[name]
    else:
        # sha1, not hash(): Python salts str hashes per process, and figures must agree across runs
        h = int(hashlib.sha1(name.encode()).hexdigest(), 16)
        color, marker = SPARE_COLORS[h % len(SPARE_COLORS)], SPARE_MARKERS[(h // 7) % len(SPARE_MARKERS)]
    style = {"color": color, "marker": marker, "linestyle": "-", "markerfacecolor": color}
    if name != BASELINE and is_reference(name):
        style.update(REFERENCE, markerfacecolor=REFERENCE["color"])
    return style


def _method_of(label: str) -> str:
    """The method a legend label names ("resolution (baseline)" -> "resolution")."""
    return label[: -len(REFERENCE_SUFFIX)] if label.endswith(REFERENCE_SUFFIX) else label


def method_order(names) -> list[str]:
    """Legend order: the baseline, the reference methods, built-ins in a fixed order, then the rest by name.

    ``names`` may be methods or their legend labels (:func:`harness.report.method_label`)."""
    known = list(KNOWN)

    def key(n):
        m = base_method(_method_of(n))
        return n != BASELINE, not is_reference(m), known.index(m) if m in known else len(known), n

    return sorted(set(names), key=key)


@contextmanager
def paper_style():
    """rcParams for column-width figures: 8 pt text, thin lines, no top/right spines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rc = {"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "xtick.labelsize": 8, "ytick.labelsize": 8,
          "legend.fontsize": 8, "axes.linewidth": 0.6, "lines.linewidth": 1.2, "lines.markersize": 4.5,
          "axes.spines.top": False, "axes.spines.right": False, "grid.linewidth": 0.4, "grid.alpha": 0.5,
          "xtick.major.width": 0.6, "ytick.major.width": 0.6, "savefig.dpi": 200, "pdf.fonttype": 42,
          "font.family": "DejaVu Sans"}
    with plt.rc_context(rc):
        yield plt


def _panels(plt, n: int, sharey: bool = False):
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(PANEL_W * cols, PANEL_H * rows), squeeze=False, sharey=sharey)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _cells(group, method: str) -> list[dict]:
    """``method``'s measured cells (ok and off target) at its newest version in one environment."""
    cur = current(group)
    rows = cur[cur["status"].isin(MEASURED) & (cur["method"] == method)]
    return [r.to_dict() for _, r in rows.iterrows()]


def _accuracy_points(group, x_of, method: str) -> list[tuple]:
    """(x, top-1 %, low, high, off target) of ``method``'s measured cells, sorted by x; low/high the
    95 % Wilson interval (None without n_images)."""
    pts = [(x_of(r), 100 * _num(r["top1"]), *top1_interval(r), r["status"] == "off_target")
           for r in _cells(group, method) if _num(r["top1"]) is not None]
    return sorted((p for p in pts if p[0] is not None), key=lambda p: p[:2])


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
                markeredgecolor=style["color"], label="_off_target", zorder=extra.get("zorder", 2) + 0.1)
        # one legend entry says what hollow means, whichever method it is
        ax.plot([], [], color="#444444", marker="o", linestyle="none", markerfacecolor="white", label=OFF_TARGET)


def _error_bars(ax, pts, name: str) -> None:
    """Vertical bars from (x, y, low, high, ...) points; those without an interval get none."""
    pts = [p for p in pts if p[2] is not None and p[3] is not None]
    if not pts:
        return
    xs, ys, lows, highs = zip(*(p[:4] for p in pts))
    ax.errorbar(xs, ys, yerr=[[y - lo for y, lo in zip(ys, lows)], [hi - y for y, hi in zip(ys, highs)]],
                fmt="none", ecolor=method_style(name)["color"], elinewidth=0.6, capsize=1.5, alpha=0.7,
                label="_interval", zorder=1.5)


def _title(ax, text: str) -> None:
    ax.set_title(textwrap.fill(text, 44))


def _baseline_marker(ax, x: float, y: Optional[float], *interval) -> None:
    """The baseline as a star at (x, y) with a dotted line at its accuracy; (1, 1) when y is None.
    ``interval`` (low, high) adds its error bar."""
    style = method_style(BASELINE)
    if y is None:
        x = y = 1.0
    else:
        ax.axhline(y, color=style["color"], linewidth=0.6, linestyle=":", zorder=1)
        _error_bars(ax, [(x, y, *interval)], BASELINE)
    ax.plot([x], [y], marker=style["marker"], color=style["color"], markersize=8, linestyle="none",
            label=BASELINE, zorder=5)


def _methods(group) -> list[str]:
    cur = current(group)
    return method_order(m for m in cur.loc[cur["status"].isin(MEASURED), "method"] if m != BASELINE)


def _baseline_point(group, x_of) -> Optional[tuple]:
    """(x, top-1 %, low, high) of the environment's baseline, or None."""
    base = baseline_of(group)
    if base is None or _num(base.get("top1")) is None or x_of(base) is None:
        return None
    return (x_of(base), 100 * _num(base["top1"]), *top1_interval(base))


def _accuracy_panel(ax, env: dict, group, x_key: str, anchored: bool) -> list[tuple]:
    """Each method's top-1 against ``x_key`` with intervals; returns every point drawn."""
    x_of = (lambda r: _num(r.get(x_key)))
    base = _baseline_point(group, x_of)
    drawn = []
    for m in _methods(group):
        pts = _accuracy_points(group, x_of, m)
        # every method at its identity knob is the baseline, so its curve starts there
        _line(ax, [p[:2] for p in pts], m, anchor=base[:2] if base and anchored else None,
              hollow=[p[:2] for p in pts if p[4]])
        _error_bars(ax, pts, m)
        drawn += [p[:2] for p in pts]
    if base:
        _baseline_marker(ax, *base)
        drawn.append(base[:2])
    _title(ax, env["label"])
    ax.set_ylabel("top-1 (%)")
    ax.grid(True)
    return drawn


def _pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both throughput (x) and accuracy (y), by x."""
    front, best = [], -float("inf")
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return sorted(front)


def _legend(fig, axes) -> None:
    """One legend for all panels, below them, in the fixed method order."""
    handles = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if not lab.startswith("_"):
                handles.setdefault(lab, h)
    order = method_order(n for n in handles if n not in GUIDES) + [g for g in GUIDES if g in handles]
    fig.tight_layout(h_pad=1.2, w_pad=1.5)
    if not order:
        return
    fig.legend([handles[n] for n in order], order, loc="upper center", ncol=min(len(order), 4), frameon=False,
               bbox_to_anchor=(0.5, 0.0), handlelength=2.2, columnspacing=1.2)


def accuracy_vs_gmacs(plt, envs):
    fig, axes = _panels(plt, len(envs))
    for ax, (env, group) in zip(axes, envs):
        _accuracy_panel(ax, env, group, "gmacs", anchored=True)
        ax.set_xlabel("GMACs")
    _legend(fig, axes)
    return fig


def accuracy_vs_throughput(plt, envs):
    fig, axes = _panels(plt, len(envs))
    for ax, (env, group) in zip(axes, envs):
        front = _pareto(_accuracy_panel(ax, env, group, "img_per_s", anchored=False))
        if len(front) > 1:
            xs, ys = zip(*front)
            # best accuracy reachable at >= a throughput: each front point holds back to the previous one
            ax.step(xs, ys, where="pre", color="#cccccc", linewidth=3.5, zorder=0, label=PARETO)
        if env["device_short"] not in env["label"]:
            _title(ax, f"{env['label']} ({env['device_short']}, {env['dtype']})")
        ax.set_xlabel("throughput (img/s)")
    _legend(fig, axes)
    return fig


def speedup_vs_ideal(plt, envs):
    fig, axes = _panels(plt, len(envs))
    for ax, (env, group) in zip(axes, envs):
        base = baseline_of(group)
        top = 1.0
        for m in _methods(group):
            pts = _speedup_points(group, m, base)
            _line(ax, [p[:2] for p in pts], m, anchor=(1.0, 1.0), hollow=[p[:2] for p in pts if p[4]])
            _error_bars(ax, pts, m)
            top = max([top] + [max(p[0], p[3] or p[1]) for p in pts])
        if base is not None:
            _baseline_marker(ax, 1.0, None)
        end = 1 + (top - 1) * 1.08
        ax.plot([1, end], [1, end], color="#444444", linestyle="--", linewidth=0.7, zorder=0, label=IDEAL)
        _title(ax, env["label"])
        ax.set_xlabel("ideal speed-up (GMACs ratio)")
        ax.set_ylabel("measured speed-up")
        ax.grid(True)
    _legend(fig, axes)
    return fig


def _speedup_points(group, method: str, base: Optional[dict]) -> list[tuple]:
    """(ideal, measured speed-up, q1, q3, off target) of ``method``'s measured cells, by ideal speed-up;
    q1/q3 None where the speed-up is not from interleaved rounds."""
    pts = []
    for r in _cells(group, method):
        gmacs, base_gmacs = _num(r["gmacs"]), _num(r["gmacs_baseline"])
        s = speedup_of(r, base)
        if gmacs and base_gmacs and s["speedup"]:
            pts.append((base_gmacs / gmacs, s["speedup"], s["speedup_q1"], s["speedup_q3"], r["status"] == "off_target"))
    return sorted(pts, key=lambda p: p[:2])


def default_budget(envs) -> Optional[str]:
    """The middle budget of those stored (0.7 of 0.9/0.7/0.5), for the schedule plot."""
    budgets = sorted({str(b) for _, g in envs for b in current(g).loc[lambda c: c["status"] == "ok", "budget"]
                      if b != "baseline"},
                     key=budget_order)
    return budgets[len(budgets) // 2] if budgets else None


def tokens_per_block(plt, envs, budget: Optional[str] = None):
    budget = budget or default_budget(envs)
    fig, axes = _panels(plt, len(envs), sharey=False)
    for ax, (env, group) in zip(axes, envs):
        ok = current(group)
        ok = ok[ok["status"] == "ok"]
        cells = ok[ok["budget"].astype(str) == str(budget)]
        for i, m in enumerate(method_order(cells["method"])):
            sched = cells[cells["method"] == m]["tokens_per_block"].iloc[0]
            if isinstance(sched, list) and sched:
                # methods sharing a schedule (evit, topk, random) overlap: earlier ones drawn wider, beneath
                _line(ax, list(enumerate(sched, 1)), m, drawstyle="steps-mid", linewidth=max(3.2 - 0.6 * i, 0.9),
                      zorder=2 + i, markevery=_changes(sched), alpha=0.9)
        base = baseline_of(group)
        if base is not None and isinstance(base.get("tokens_per_block"), list):
            n = base["tokens_per_block"]
            ax.plot(range(1, len(n) + 1), n, color="black", linestyle=":", linewidth=0.8, label=BASELINE)
            ax.set_xticks(range(1, len(n) + 1))
        _title(ax, env["label"])
        ax.text(0.98, 0.96, f"budget {budget}", transform=ax.transAxes, ha="right", va="top")
        ax.set_xlabel("block")
        ax.set_ylabel("tokens after block")
        ax.set_ylim(bottom=0)
        ax.grid(True)
    _legend(fig, axes)
    return fig


def _changes(schedule: list) -> list[int]:
    """Indices where a schedule changes (and its last block): where its markers go."""
    return [i for i in range(len(schedule)) if i == len(schedule) - 1 or (i and schedule[i] != schedule[i - 1])
            or (i == 0 and len(schedule) > 1 and schedule[0] != schedule[1])]


def save(fig, out_dir: Path, name: str, formats: tuple[str, ...] = ("png", "pdf")) -> list[Path]:
    """Write ``name``.png and ``name``.pdf (or ``formats``) under ``out_dir``; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.{ext}" for ext in formats]
    for p in paths:
        # no creation date in PDFs: regenerating unchanged figures leaves the files unchanged
        meta = {"CreationDate": None} if p.suffix == ".pdf" else None
        fig.savefig(p, bbox_inches="tight", pad_inches=0.02, metadata=meta)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return paths


def write_plots(results_dir: Path, reports_dir: Path, budget: Optional[str] = None) -> list[Path]:
    """Every figure of the module docstring, from stored records, under ``<reports_dir>/figures``.

    Args:
        results_dir: where the records are (``<results_dir>/records/*.json``).
        reports_dir: the reports directory; figures go to its ``figures/``.
        budget: the budget of the tokens-per-block plot (default: the middle stored budget).

    Returns:
        The paths written.
    """
    envs = environments(load_frame(results_dir))
    out = Path(reports_dir) / "figures"
    written = []
    # accuracy figures only for environments with accuracy (the speed suite's synthetic data has none)
    scored = scored_envs(envs)
    with paper_style() as plt:
        for name, draw, shown in (("accuracy_vs_gmacs", accuracy_vs_gmacs, scored),
                                  ("accuracy_vs_throughput", accuracy_vs_throughput, scored),
                                  ("speedup_vs_ideal", speedup_vs_ideal, envs)):
            if shown:
                written += save(draw(plt, shown), out, name)
        written += save(tokens_per_block(plt, envs, budget), out, "tokens_per_block")
    log.info("wrote %d figure files to %s", len(written), out)
    return written
