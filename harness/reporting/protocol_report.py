"""Off the shelf against fine-tuned, from stored records only: the pairs, their table, the training curves.

For the report (``harness/reporting/report.py``, ``harness/reporting/plots.py`` call these): each fine-tuned record is
paired with the off-the-shelf record of the same model, weights, method, options, budget and eval
set, and the two are compared per image (exact McNemar, :func:`harness.measurement.stats.paired_test`).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional

from harness.measurement import stats
from harness.training.recipes import OFF_THE_SHELF

MEASURED = ("ok", "off_target")
# what a fine-tuned record shares with its off-the-shelf partner (the key less the protocol's fields)
PARTNER_FIELDS = ("model", "checkpoint_sha", "method", "method_version", "method_options", "budget", "eval_set_sha",
                  "dtype", "limit", "device_name", "attention", "prop_attn", "sdpa_backend")


def protocol_of(rec: dict) -> str:
    """A record's protocol (records from before protocols existed are off the shelf)."""
    return rec.get("protocol") or OFF_THE_SHELF


def _partner_key(rec: dict, fields: tuple[str, ...] = PARTNER_FIELDS) -> str:
    return json.dumps([rec.get(k) for k in fields], sort_keys=True, default=str)


# a cell refused before it read its images (unsupported) has no eval set hash to match on
REFUSED_FIELDS = tuple(f for f in PARTNER_FIELDS if f != "eval_set_sha")


def protocol_pairs(records: list[dict], results_dir: Path) -> list[dict]:
    """One row per measured fine-tuned record that has an off-the-shelf partner.

    Row: model, method, budget, protocol, top-1 of both with their 95 % Wilson intervals (fractions),
    ``delta_top1`` (fine-tuned minus off the shelf), the McNemar ``b`` (only off the shelf right),
    ``c`` (only fine-tuned right) and ``p`` (None when the predictions do not pair), and the
    fine-tune's steps, final loss and wall time. A partner that was not measured (``unsupported``
    off the shelf: DynamicViT) gives a row too, its status and reason in ``off_the_shelf_status`` and
    no top-1, difference or test.
    """
    off = [r for r in records if protocol_of(r) == OFF_THE_SHELF]
    shelf = {_partner_key(r): r for r in off if r.get("status") in MEASURED and r.get("top1") is not None}
    refused = {_partner_key(r, REFUSED_FIELDS): r for r in off if r.get("status") not in MEASURED}
    rows = []
    for tuned in (r for r in records if protocol_of(r) != OFF_THE_SHELF and r.get("status") in MEASURED):
        base = shelf.get(_partner_key(tuned))
        if base is not None and tuned.get("top1") is not None:
            rows.append(_pair_row(base, tuned, results_dir))
        elif _partner_key(tuned, REFUSED_FIELDS) in refused and tuned.get("top1") is not None:
            rows.append(_unpaired_row(refused[_partner_key(tuned, REFUSED_FIELDS)], tuned))
    return sorted(rows, key=lambda r: (r["model"], str(r["budget"]), r["method"], r["protocol"]))


def _unpaired_row(base: dict, tuned: dict) -> dict:
    """A fine-tuned cell whose off-the-shelf partner was not measured (DynamicViT: ``unsupported``,
    its predictors need training): the partner's status and reason where its top-1 would be."""
    reason = base.get("status_reason") or base.get("error") or ""
    return _row(base, tuned, top1_off_the_shelf=None, ci_off_the_shelf=None, delta_top1=None, b=None, c=None, p=None,
                off_the_shelf_status=f"{base.get('status')}: {reason}".rstrip(": "))


def _pair_row(base: dict, tuned: dict, results_dir: Path) -> dict:
    paired = stats.paired_test(base, tuned, results_dir)
    return _row(base, tuned, top1_off_the_shelf=base["top1"], off_the_shelf_status=base.get("status"),
                ci_off_the_shelf=stats.wilson(round(base["top1"] * base["n_images"]), base["n_images"]),
                delta_top1=tuned["top1"] - base["top1"], b=paired.b if paired else None,
                c=paired.c if paired else None, p=paired.p if paired else None)


def _row(base: dict, tuned: dict, **off_the_shelf) -> dict:
    """The row's fields, in the CSV's column order: the cell, the off-the-shelf side, the fine-tuned side."""
    n = tuned["n_images"]
    shelf = {k: off_the_shelf[k] for k in ("top1_off_the_shelf", "ci_off_the_shelf", "off_the_shelf_status")}
    tests = {k: off_the_shelf[k] for k in ("delta_top1", "b", "c", "p")}
    return {"model": tuned["model"], "method": tuned["method"], "budget": tuned["budget"],
            "protocol": protocol_of(tuned), **shelf,
            "top1_finetuned": tuned["top1"], "ci_finetuned": stats.wilson(round(tuned["top1"] * n), n), **tests,
            "train_steps": tuned.get("train_steps"), "train_loss_final": tuned.get("train_loss_final"),
            "train_s": tuned.get("train_s"), "cells": (base["cell_id"], tuned["cell_id"])}


def pairs_markdown(rows: list[dict]) -> str:
    """The pairs as a markdown table (top-1 in %, † p >= 0.05)."""
    head = ("| model | budget | method | protocol | off the shelf [95 % CI] | fine-tuned [95 % CI] | Δ top-1 "
            "| b | c | p | steps | final loss |\n|" + "---|" * 12)
    lines = [head]
    for r in rows:
        p = "-" if r["p"] is None else f"{r['p']:.3g}{' †' if r['p'] >= 0.05 else ''}"
        shelf = (r["off_the_shelf_status"] if r["top1_off_the_shelf"] is None
                 else _pct(r["top1_off_the_shelf"], r["ci_off_the_shelf"]))
        delta = "-" if r["delta_top1"] is None else f"{100 * r['delta_top1']:+.2f}"
        lines.append(f"| {r['model']} | {r['budget']} | {r['method']} | {r['protocol']} | {shelf} "
                     f"| {_pct(r['top1_finetuned'], r['ci_finetuned'])} | {delta} | {_dash(r['b'])} "
                     f"| {_dash(r['c'])} | {p} | {_dash(r['train_steps'])} | {_loss(r['train_loss_final'])} |")
    return "\n".join(lines)


def _pct(top1: float, ci: tuple[float, float]) -> str:
    return f"{100 * top1:.2f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _dash(v) -> str:
    return "-" if v is None else str(v)


def _loss(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.4f}"


def training_log(rec: dict, results_dir: Path) -> list[dict]:
    """A fine-tuned record's per-step log (``step``, ``loss``, ``lr``, ...) as floats; [] when absent."""
    path = Path(results_dir) / rec.get("finetune_dir", "") / rec.get("train_log", "log.csv")
    if not rec.get("finetune_dir") or not path.is_file():
        return []
    with open(path, newline="") as fh:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]


def plot_training_curves(records: list[dict], results_dir: Path, figures_dir: Path) -> list[Path]:
    """``training_curves.{png,pdf,pgf}``: loss and learning rate per step of every fine-tuned record."""
    runs = [(r, training_log(r, results_dir)) for r in records if protocol_of(r) != OFF_THE_SHELF]
    runs = [(r, log) for r, log in runs if log]
    if not runs:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(8, 3))
    for rec, log in runs:
        label = f"{rec['model']} {rec['method']} @ {rec['budget']} ({protocol_of(rec)})"
        ax_loss.plot([row["step"] for row in log], [row["loss"] for row in log], label=label, lw=1)
        ax_lr.plot([row["step"] for row in log], [row["lr"] for row in log], lw=1)
    ax_loss.set(xlabel="update", ylabel="training loss")
    ax_lr.set(xlabel="update", ylabel="learning rate")
    ax_loss.legend(fontsize=6)
    fig.tight_layout()
    from harness.reporting.plots import save

    return save(fig, Path(figures_dir), "training_curves")  # PNG, PDF and PGF, no dates in the files
