"""One visual identity per method across every figure, and what the accuracy figure shows by default,
checked on the committed reference run (results/reference: 13 methods, 8 random@method controls)."""
from pathlib import Path

import pytest
from matplotlib.lines import Line2D

from harness.reporting import plots
from harness.reporting.report import environments, load_frame, method_label, scored_envs

REFERENCE = Path(__file__).parents[1] / "results" / "reference"


@pytest.fixture(scope="module")
def envs():
    return environments(load_frame(REFERENCE))


@pytest.fixture(scope="module")
def figures(envs):
    scored = scored_envs(envs)
    with plots.paper_style() as plt:
        figs = {"accuracy_vs_gmacs": plots.accuracy_vs_gmacs(plt, scored),
                "matched_budget": plots.matched_budget(plt, scored),
                "controls": plots.controls_figure(plt, scored),
                "speedup_vs_ideal": plots.speedup_vs_ideal(plt, envs),
                "tokens_per_block": plots.tokens_per_block(plt, envs)}
        yield figs
        plt.close("all")


def _look(line: Line2D) -> tuple:
    """What a reader sees of a line: colour, marker, face, and its dash pattern (scale-free)."""
    return (line.get_color(), line.get_marker(), line.get_markerfacecolor(), line._unscaled_dash_pattern)


def _expected(method: str, drawn: Line2D) -> tuple:
    s = plots.method_style(method)
    ref = Line2D([0], [0], color=s["color"], marker=s["marker"], markerfacecolor=s["markerfacecolor"],
                 linestyle=drawn.get_linestyle() if drawn.get_linestyle() == "None" else s["linestyle"],
                 linewidth=drawn.get_linewidth())
    return _look(ref)


def test_a_method_looks_the_same_in_every_figure(figures):
    labels = {method_label(m): m for m in plots.KNOWN} | {method_label(f"random@{m}"): f"random@{m}" for m in plots.KNOWN}
    seen: dict[str, set] = {}
    for name, fig in figures.items():
        for ax in fig.axes:
            for line in ax.lines:
                if line.get_label() in labels:
                    method = labels[line.get_label()]
                    assert _look(line) == _expected(method, line), (name, method)
                    seen.setdefault(method, set()).add(name)
            if name == "tokens_per_block" and ax.get_title() in labels:  # a panel per method: its colour
                colour = plots.method_style(labels[ax.get_title()])["color"]
                drawn = [ln for ln in ax.lines if len(ln.get_xdata()) and ln.get_linestyle() != ":"]
                assert drawn and {ln.get_color() for ln in drawn} == {colour}
                seen.setdefault(labels[ax.get_title()], set()).add(name)
    # each method drawn in several figures, so the comparison above had something to compare
    assert {"tome", "resolution", "mctf"} <= {m for m, names in seen.items() if len(names) >= 3}


def test_accuracy_figure_at_most_eight_series_and_no_controls(figures, envs):
    legend = [t.get_text() for t in figures["accuracy_vs_gmacs"].legends[0].get_texts()]
    series = [t for t in legend if t not in plots.GUIDES]
    assert len(series) <= plots.MAX_SERIES and "none" in series and "resolution (baseline)" in series
    assert not any("@" in t for t in series)
    # the controls have their figure: each is there, in its leader's colour
    ctrl = figures["controls"]
    assert {t.get_text() for ax in ctrl.axes for t in ax.get_yticklabels()} >= {"tome", "mctf", "ppt"}
    # --methods picks the series
    with plots.paper_style() as plt:
        fig = plots.accuracy_vs_gmacs(plt, scored_envs(envs), methods=["evit", "topk"])
        shown = {t.get_text() for t in fig.legends[0].get_texts()} - set(plots.GUIDES)
        assert shown == {"none", "evit", "topk"}
        plt.close(fig)


def test_titles_from_the_card_fields(figures):
    titles = [ax.get_title() for ax in figures["accuracy_vs_gmacs"].axes]
    assert titles == ["DeiT-S · CIFAR-10 · 200 images", "DeiT-T · CIFAR-10 · 200 images"]


def test_unknown_method_gets_a_style_of_its_own():
    from harness.reporting.style import KNOWN

    s = plots.method_style("someones_plugin")
    assert s == plots.method_style("someones_plugin")  # deterministic (sha1; a cross-process test is in test_plots)
    assert (s["color"], s["marker"]) not in {(c, m) for c, m, _ in KNOWN.values()} and s["marker"] not in \
        {m for _, m, _ in KNOWN.values()}
