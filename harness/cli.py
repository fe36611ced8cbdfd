"""Command line: ``python -m harness ls|run|report|plot|tokenmap``. The only module that prints."""
from __future__ import annotations

import argparse
import difflib
import logging
import sys
import warnings
from pathlib import Path
from typing import Optional

from harness.sweep.config import PROP_ATTN, QUICK_METHODS, QUICK_RUN
from harness.errors import HarnessError
from harness.paths import default_config


def _csv(flag: str):
    """``flag``'s comma-separated list; an empty item (``0.7,,0.5``, a trailing comma) is an error, never dropped."""
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",")]
        if not all(items):
            raise HarnessError(f"{flag} {text!r} has an empty item: separate the values by single commas")
        return items

    return parse


class _Parser(argparse.ArgumentParser):
    """argparse, with errors that guide: one line naming the nearest flag, then the command's usage in one line.

    An unrecognized flag is reported by the subcommand that was given it (``run``'s usage, not the
    top level's), with the closest of that subcommand's own option strings.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.commands: dict[str, argparse.ArgumentParser] = {}  # the subcommands' parsers, by name

    def parse_args(self, args=None, namespace=None):
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            command = self.commands.get(getattr(ns, "command", None), self)
            command.error(_unrecognized(extras, command, self))
        return ns

    def error(self, message: str):
        self.exit(2, f"error: {message}\nusage: {self.short_usage()}\n")

    def short_usage(self) -> str:
        """``prog [options] POSITIONALS``, and how to see every option: one line, whatever the option count."""
        fmt = self._get_formatter()
        positionals = "".join(f" {fmt._format_args(a, a.dest)}" for a in self._get_positional_actions())
        return f"{self.prog} [options]{positionals}; options: {self.prog} -h"


def _unrecognized(extras: list[str], command: argparse.ArgumentParser, top: argparse.ArgumentParser) -> str:
    """The message "unrecognized argument --method; did you mean --methods?", over ``command``'s own option strings."""
    flags = [e.partition("=")[0] for e in extras if e.startswith("-")]
    if not flags:
        return f"unrecognized argument{'s' if len(extras) > 1 else ''} {' '.join(extras)}"
    return f"unrecognized argument{'s' if len(flags) > 1 else ''} " + ", ".join(
        _nearest_flag(f, command, top) for f in flags)


def _nearest_flag(flag: str, command: argparse.ArgumentParser, top: argparse.ArgumentParser) -> str:
    if command is not top and flag in top._option_string_actions:
        return f"{flag} (an option of python -m harness itself: put it before {command.prog.split()[-1]})"
    close = difflib.get_close_matches(flag, list(command._option_string_actions), n=1, cutoff=0.6)
    return f"{flag}; did you mean {close[0]}?" if close else flag


def _parser() -> argparse.ArgumentParser:
    # allow_abbrev=False everywhere: a prefix (--data for --data-root) must never be taken for another flag
    p = _Parser(prog="python -m harness", description="Token-reduction benchmark harness for timm ViTs.",
                allow_abbrev=False)
    p.add_argument("-v", "--verbose", action="store_true", help="log library messages")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p.commands = sub.choices
    _add_ls(sub)
    run = sub.add_parser("run", allow_abbrev=False, help="run a sweep of models x methods x budgets")
    _add_run_selection(run)
    _add_run_measurement(run)
    _add_run_executor(run)
    _add_report_and_plot(sub)
    _add_tokenmap(sub)
    return p


def _add_ls(sub) -> None:
    ls = sub.add_parser("ls", allow_abbrev=False, help="list methods, models, suites or fine-tuning recipes")
    ls.add_argument("what", choices=["methods", "models", "suites", "recipes"])
    ls.add_argument("--config", type=Path, default=None)
    ls.add_argument("--data-root", default=None)


def _add_run_selection(run) -> None:
    """What a sweep runs: config, suite, models, methods, budgets, data, weights, where results go."""
    run.add_argument("--config", type=Path, default=None, help="benchmark.toml (default: ./benchmark.toml, else the built-in defaults)")
    run.add_argument("--suite", help="suite of the config to run (default: [run] suite)")
    run.add_argument("--models", type=_csv("--models"), help="comma-separated model names")
    run.add_argument("--methods", type=_csv("--methods"), help="comma-separated method names, or all")
    run.add_argument("--budgets", type=_csv("--budgets"), help="comma-separated budgets: 0.7, gmacs=2.9, r=13, keep_rate=0.7")
    run.add_argument("--limit", type=int, help="evaluate the first N images (class-balanced); 0 = all")
    run.add_argument("--protocol", dest="protocols", type=_csv("--protocol"), metavar="off-the-shelf|finetune:RECIPE",
                     help="measure the patched model as given (off-the-shelf, the default) or after fine-tuning it "
                          "with a [recipes.RECIPE] of the config (finetune:cpu-smoke); a fine-tune also runs its "
                          "off-the-shelf partner cell, for the paired comparison. Comma-separated for several")
    run.add_argument("--quick", action="store_true",
                     help=f"a quick look (about 5 min on 2 CPU cores): --methods all at the suite's models and "
                          f"budgets, --limit {QUICK_RUN['limit']} --calib-limit {QUICK_RUN['calib_limit']} "
                          f"(DiffRate's search shrinks with it) --repeats "
                          f"{QUICK_RUN['throughput_repeats']}, one warm-up call, no batch-1 latency; flags given "
                          f"override these. Intervals are wide (+-15 points or more): a look, not a result")
    run.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    run.add_argument("--dtype", help="auto, fp32, fp16, bf16")
    run.add_argument("--batch-size", type=int)
    run.add_argument("--results", dest="results_dir", help="results directory (default results/local)")
    run.add_argument("--out", dest="reports_dir", help="reports directory (default <results>/reports)")
    run.add_argument("--data-root", help="where datasets/ and models/ live (default: $HARNESS_DATA_ROOT, else ./shared or ../shared)")
    run.add_argument("--weights", metavar="random|pretrained|PATH",
                     help="weights of the models of --models (or the suite): seeded random init, timm's pretrained "
                          "weights from the local Hugging Face / timm cache, or a .safetensors/.pth file")
    run.add_argument("--data", metavar="synthetic|cifar10|imagenet[:PATH]",
                     help="eval data of the models of --models (or the suite): synthetic inputs (no accuracy), the "
                          "CIFAR-10 test split, the shared ImageNet sample or an ImageNet-style val folder; "
                          "--weights random alone implies synthetic")


def _add_run_measurement(run) -> None:
    """How each cell is measured: resume, calibration, kernels, timing, counts."""
    run.add_argument("--overwrite", action="store_true", default=None, help="re-run cells already stored")
    run.add_argument("--recalibrate", action="store_true", default=None, help="search again instead of using cached calibration results")
    run.add_argument("--calib-limit", type=int, help="training images a calibrating method (DiffRate) searches on")
    run.add_argument("--compile", action="store_true", default=None,
                     help="torch.compile each patched model (failures and graph breaks recorded)")
    run.add_argument("--throughput-batch-size", type=int, help="model-only throughput batch (0 = 256 on GPU, 8 on CPU)")
    run.add_argument("--attention", choices=["fused", "eager"],
                     help="fused: timm's scaled_dot_product_attention (default); eager: softmax(q k^T) v, as the official patches")
    run.add_argument("--sdpa-backend", choices=["auto", "flash", "efficient", "cudnn", "math"],
                     help="pin scaled_dot_product_attention to one kernel for every method (default auto)")
    run.add_argument("--prop-attn", choices=PROP_ATTN,
                     help="how proportional attention (ToMe, DiffRate) reaches SDPA: mask (default, the reference), "
                          "fold (log-size folded into q/k, no mask: flash-eligible) or flex (FlexAttention)")
    run.add_argument("--repeats", dest="throughput_repeats", type=int,
                     help="timed throughput calls (default 30 on GPU, 5 on CPU)")
    run.add_argument("--e2e", dest="end_to_end", action="store_true", default=None,
                     help="also time decode + copy + transform + model")
    run.add_argument("--no-flops", dest="flops", action="store_false", default=None,
                     help="skip fvcore's measured GMACs")


def _add_run_executor(run) -> None:
    """Where cells run (this process, submitit, Slurm) and what is printed at the end."""
    run.add_argument("--no-report", action="store_true",
                     help="write no report and no figures at the end (the summary: status counts only)")
    run.add_argument("--executor", choices=["local", "submitit-local", "slurm"], default="local",
                     help="local: this process (or torchrun ranks); submitit-local / slurm: one submitit job per --cells-per-job cells")
    run.add_argument("--cells-per-job", type=int, default=1, help="cells per submitit job")
    run.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                     help="submitit AutoExecutor parameter, e.g. slurm_partition=gpu, gpus_per_node=1, timeout_min=120")


def _add_report_and_plot(sub) -> None:
    rep = sub.add_parser("report", allow_abbrev=False, help="tables from stored results (no model runs)")
    rep.add_argument("--config", type=Path, default=None)
    rep.add_argument("--results", dest="results_dir", help="results directory")
    rep.add_argument("--out", dest="reports_dir", help="reports directory")
    rep.add_argument("--no-plots", action="store_true", help="tables only")
    rep.add_argument("--readme", action="append", default=[], type=Path, metavar="FILE",
                     help="rewrite the marked results block of FILE (README.md) from the report; repeatable")
    plot = sub.add_parser("plot", allow_abbrev=False, help="figures (PNG, PDF, PGF) from stored results (no model runs)")
    plot.add_argument("--config", type=Path, default=None)
    plot.add_argument("--results", dest="results_dir", help="results directory")
    plot.add_argument("--out", dest="reports_dir", help="reports directory (figures go to its figures/)")
    plot.add_argument("--budget", help="budget of the tokens-per-block plot (default: the middle one stored)")
    for p in (rep, plot):
        p.add_argument("--methods", type=_csv("--methods"),
                       help="methods of the accuracy and speed figures (default: none, resolution and the highest "
                            "mean top-1, at most 8 series)")
        p.add_argument("--style", choices=("paper", "slides"), default="paper",
                       help="type sizes: paper (8 pt, 3.25 / 6.75 in wide) or slides")
        p.add_argument("--width", choices=("single", "double", "both"), default="both",
                       help="figure widths written: single column (<name>-single.*), double (<name>.*) or both")


def _add_tokenmap(sub) -> None:
    tm = sub.add_parser("tokenmap", allow_abbrev=False, help="token maps on test images: kept, merged and dropped patches (runs the model)")
    tm.add_argument("--config", type=Path, default=None)
    tm.add_argument("--model", default="deit_tiny_cifar10")
    tm.add_argument("--methods", type=_csv("--methods"), default=["tome", "evit", "topk", "random"])
    tm.add_argument("--budget", default="0.7", help="0.7, gmacs=0.9 or a knob (r=13)")
    tm.add_argument("--images", type=int, default=4, help="first N test images, class-balanced")
    tm.add_argument("--depths", type=_csv("--depths"), help="1-based blocks to show (default: 4,7,10,12 of 12)")
    tm.add_argument("--out", dest="reports_dir", help="reports directory (figures go to its figures/)")
    tm.add_argument("--data-root", help="where datasets/ and models/ live")
    tm.add_argument("--results", dest="results_dir",
                    help="results directory whose calibration cache a searching method (DiffRate) reads and fills")
    tm.add_argument("--calib-limit", type=int,
                    help="training images a searching method (DiffRate) searches on (default: [run] calib_limit)")


def _load(args):
    from harness.sweep.config import load_config

    return load_config(args.config or default_config())


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    """``rows`` as lines, every column but the last padded to its widest entry: long names never overflow."""
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return [" ".join([*(c.ljust(w) for c, w in zip(r, widths)), r[-1]]).rstrip() for r in rows]


def cmd_ls(args) -> int:
    if args.what == "methods":
        from harness.registry import method_infos

        rows = [(i.name, f"knob {i.knob or '-'}", i.description) for i in method_infos()]
    elif args.what == "suites":
        rows = _suite_rows(_load(args))
    elif args.what == "recipes":
        rows = _recipe_rows(_load(args))
    else:
        rows = _model_rows(_load(args), args.data_root)
    for line in _columns(rows):
        print(line)
    if args.what == "models":
        print("(any timm ViT name, arch.tag: pretrained weights from the local Hugging Face / timm cache, "
              "or run --weights random|PATH --data synthetic|imagenet:PATH)")
    return 0


def _suite_rows(cfg) -> list[tuple[str, str]]:
    rows = []
    for name, s in cfg.suites.items():
        rows.append((name, f"models {','.join(s.models)} | methods {','.join(s.methods)} "
                           f"| budgets {','.join(s.budgets)}"
                           + (f" | protocols {','.join(s.protocols)}" if s.protocols != ("off-the-shelf",) else "")))
        rows += [("", f"  {model}: budgets {','.join(b)}") for model, b in s.budgets_by_model.items()]
        rows += [("", f"  {method}: {', '.join(f'{k}={v}' for k, v in opts.items())}")
                 for method, opts in s.method_options.items()]
    return rows


def _recipe_rows(cfg) -> list[tuple[str, str]]:
    """One line per ``[recipes.<name>]``: what ``--protocol finetune:<name>`` trains with."""
    return [(f"finetune:{name}", f"{r.epochs} epoch(s){f' (at most {r.steps} steps)' if r.steps else ''} over "
                                 f"{r.train_limit or 'all'} training images, batch {r.batch_size}, {r.opt} lr {r.lr:g}, "
                                 f"distill {r.distill}{f' | {r.where}' if r.where else ''}")
            for name, r in cfg.recipes.items()]


def _model_rows(cfg, data_root_flag) -> list[tuple[str, str]]:
    from harness.loading.models import reference_names
    from harness.paths import data_root

    root = data_root(data_root_flag or cfg.run.data_root)
    rows = [(name, f"reference checkpoint ({root / 'models'})") for name in reference_names(root)]
    for name, m in cfg.models.items():
        what = f"card {m.card}" if m.card else f"timm {m.timm}"
        weights = m.weights or ("checkpoint" if m.checkpoint else "card's" if m.card else "pretrained")
        data = m.data or ("cifar10" if m.card else "imagenet")
        rows.append((name, f"{what}, weights {weights}{' ' + m.checkpoint if m.checkpoint else ''}, data {data}"))
    return rows


def _check_methods(args, cfg) -> None:
    """A misspelt method in ``--methods`` (or the suite's) is one line before torch is imported."""
    from harness.registry import check_method_names

    suite = cfg.suites.get(args.suite or cfg.run.suite)  # an unknown suite is said later, with its own hint
    check_method_names(args.methods or (suite.methods if suite else ()))


def cmd_run(args) -> int:
    cfg = _load(args)
    _check_methods(args, cfg)
    from harness.sweep.runner import Sweep, override, submit

    run_over = {k: getattr(args, k) for k in ("suite", "limit", "device", "dtype", "batch_size", "results_dir",
                                              "data_root", "overwrite", "recalibrate", "calib_limit", "compile",
                                              "throughput_batch_size", "end_to_end", "flops", "attention", "sdpa_backend", "prop_attn",
                                              "throughput_repeats", "reports_dir")}
    run_over, methods = quick_overrides(args.quick, run_over, args.methods)
    cfg = override(cfg, run_over, {"models": args.models, "methods": methods, "budgets": args.budgets,
                                   "protocols": args.protocols})
    cfg = _override_models(cfg, args.weights, args.data)
    if args.executor != "local":
        n = submit(cfg, args.executor, args.cells_per_job, _slurm_params(args.slurm), lambda s: print(s, flush=True))
        print(f"{n} jobs done or submitted; records in {Path(cfg.run.results_dir) / 'records'}")
        return 0
    sweep = Sweep(cfg, progress=lambda s: print(s, flush=True))
    sweep.check_inputs()
    records = sweep.execute()
    if not sweep.dist.is_main:
        return 0
    for line in _finish(sweep, cfg, args.no_report):
        print(line)
    return 1 if any(r["status"] == "error" for r in records) else 0


def _finish(sweep, cfg, no_report: bool) -> list[str]:
    """Write the report and its figures (unless ``no_report``); the short summary to print."""
    from harness.sweep.run_summary import run_summary

    results, reports, figures = Path(cfg.run.results_dir), cfg.run.reports_path, 0
    ids = [sweep.cell_id(c) for c in sweep.cells]
    if not no_report:
        from harness.reporting.plots import write_plots
        from harness.reporting.report import build_report

        # first: report.html inlines them; double column only (`harness report` writes both widths)
        figures = len(write_plots(results, reports, widths=("double",)))
        build_report(results, reports)  # the full tables go to files only
    return run_summary([sweep.store.get(i) for i in ids], results, None if no_report else reports, figures, set(ids))


def quick_overrides(quick: bool, run_over: dict, methods: Optional[list[str]]) -> tuple[dict, Optional[list[str]]]:
    """``--quick``'s run settings and methods under the flags given (a flag given wins); unchanged without it."""
    if not quick:
        return run_over, methods
    given = {k: v for k, v in run_over.items() if v is not None}
    return {**QUICK_RUN, **given}, methods or list(QUICK_METHODS)


def _override_models(cfg, weights, data):
    """``--weights`` / ``--data`` as ``[models.X]`` entries for every model the sweep runs."""
    if not weights and not data:
        return cfg
    import dataclasses

    from harness.loading.models import override_models
    from harness.paths import DataRoot

    entries = override_models(cfg.suite.models, cfg.models, DataRoot(cfg.run.data_root), weights, data)
    return dataclasses.replace(cfg, models={**cfg.models, **entries})


def _slurm_params(pairs: list[str]) -> dict:
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise HarnessError(f"--slurm takes KEY=VALUE, got {pair!r}")
        params[key] = int(value) if value.isdigit() else value
    return params


def _reports_dir(args, cfg) -> Path:
    """``--out``; else beside the records of ``--results``; else the configuration's."""
    if args.reports_dir:
        return Path(args.reports_dir)
    return Path(args.results_dir) / "reports" if args.results_dir else cfg.run.reports_path


def _widths(args) -> tuple[str, ...]:
    return ("double", "single") if args.width == "both" else (args.width,)


def cmd_report(args) -> int:
    from harness.reporting.report import build_report

    cfg = _load(args)
    results = Path(args.results_dir or cfg.run.results_dir)
    reports = _reports_dir(args, cfg)
    paths = []
    if not args.no_plots:  # first: report.html inlines them
        from harness.reporting.plots import write_plots

        paths = write_plots(results, reports, methods=args.methods, style=args.style, widths=_widths(args))
    print(build_report(results, reports))
    print(f"(tables written to {reports}: results.md, report.html, results.csv, summary.*, controls.*, "
          "accuracy_at_gmacs.*, tables/)")
    if paths:
        print(f"(figures written to {reports / 'figures'}: {len(paths)} files)")
    for page in args.readme:
        from harness.reporting.readme_block import results_block, rewrite
        from harness.reporting.report import environments, load_frame, scored_envs

        changed = rewrite(page, results_block(scored_envs(environments(load_frame(results))), reports, page))
        print(f"({page}: results block {'rewritten' if changed else 'already up to date'})")
    return 0


def cmd_plot(args) -> int:
    from harness.reporting.plots import write_plots

    cfg = _load(args)
    results = Path(args.results_dir or cfg.run.results_dir)
    reports = _reports_dir(args, cfg)
    for p in write_plots(results, reports, args.budget, args.methods, args.style, _widths(args)):
        print(p)
    return 0


def _block_numbers(items: list[str]) -> list[int]:
    """``--depths`` 1-based block numbers as 0-based indices; anything else is one clear error."""
    if not all(d.isdigit() and int(d) >= 1 for d in items):
        raise HarnessError(f"--depths {','.join(items)!r}: give 1-based block numbers, e.g. --depths 4,7,10,12")
    return [int(d) - 1 for d in items]


def cmd_tokenmap(args) -> int:
    from harness.sweep.budget import parse_budget
    from harness.paths import data_root
    from harness.measurement.tokenmap import Search, token_maps

    cfg = _load(args)
    parse_budget(args.budget)  # a malformed budget fails before the model loads
    if args.images <= 0:
        raise HarnessError("--images must be positive")
    if args.calib_limit is not None and args.calib_limit < 0:
        raise HarnessError("--calib-limit must be >= 0 (0: the whole training split)")
    depths = _block_numbers(args.depths) if args.depths else None
    root = data_root(args.data_root or cfg.run.data_root)
    search = Search(Path(args.results_dir or cfg.run.results_dir) / "cache",
                    cfg.run.calib_limit if args.calib_limit is None else args.calib_limit)
    paths = token_maps(args.model, args.methods, args.budget, args.images, Path(args.reports_dir) if args.reports_dir else cfg.run.reports_path,
                       cfg.method_options, cfg.models, root, depths, search)
    for p in paths:
        print(p)
    return 0


# (message, category, module) of third-party warnings that tell a harness user nothing they can act on
QUIET_WARNINGS = [
    # fvcore.nn scripts its focal loss at import (fvcore/nn/focal_loss.py); torch warns from its own module
    (r"`torch\.jit\.script` is deprecated", FutureWarning, r"torch\.jit\._script"),
]


def _quiet_third_party() -> None:
    """Ignore :data:`QUIET_WARNINGS`, each by message, category and module: any other warning still shows."""
    for message, category, module in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def main(argv=None) -> int:
    try:
        args = _parser().parse_args(argv)
    except HarnessError as exc:  # a list flag's type check: one line, as every bad input
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from harness import progress

    progress.to_stdout()
    try:
        with warnings.catch_warnings():  # the filters end with the command: nothing global, even in-process
            _quiet_third_party()
            return {"ls": cmd_ls, "run": cmd_run, "report": cmd_report, "plot": cmd_plot,
                    "tokenmap": cmd_tokenmap}[args.command](args)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished cells are stored; run the same command again to resume", file=sys.stderr)
        return 130
