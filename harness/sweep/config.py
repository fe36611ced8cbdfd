"""``benchmark.toml`` as frozen dataclasses; CLI flags override file values with ``dataclasses.replace``."""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from harness.errors import HarnessError
from harness.training.recipes import Recipe


ATTENTION = ("fused", "eager")
SDPA_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")
PROP_ATTN = ("mask", "fold", "flex")  # defined here, where a config loads without torch; harness.seam.PROP_ATTN_IMPLS


@dataclass(frozen=True)
class RunConfig:
    """How cells run. ``limit`` 0 means the whole eval split; ``data_root`` "" means the default lookup."""

    suite: str = "default"
    results_dir: str = "results/local"  # git-ignored: a user's own runs (the project's reference run: results/reference)
    reports_dir: str = ""               # "" = <results_dir>/reports
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 64
    limit: int = 0
    data_root: str = ""
    throughput_batch_size: int = 0
    throughput_warmup: int = -1      # untimed calls first; -1 = 10 on GPU, 2 on CPU
    throughput_repeats: int = -1     # timed calls (median, spread); -1 = 30 on GPU, 5 on CPU
    overwrite: bool = False
    calib_limit: int = 5000
    recalibrate: bool = False
    throughput_latency: bool = True  # batch-1 latency_ms next to img_per_s
    compile: bool = False            # torch.compile the patched model; failures and graph breaks recorded
    compile_backend: str = "inductor"
    end_to_end: bool = False         # e2e_img_per_s: JPEG decode + copy + transform + model
    decode_threads: int = 8
    flops: bool = True               # fvcore measured GMACs and the reduction's own overhead
    flops_images: int = 8            # first N eval images, averaged (image-dependent methods)
    attention: str = "fused"         # fused: timm's scaled_dot_product_attention; eager: softmax(q k^T) v (the official patches)
    sdpa_backend: str = "auto"       # auto | flash | efficient | cudnn | math: pin SDPA's kernel for every method
    prop_attn: str = "mask"          # proportional attention: mask (additive float mask, the reference) | fold
                                     # (log-size folded into q/k: mask-free SDPA, flash-eligible) | flex (FlexAttention)

    @property
    def reports_path(self) -> Path:
        """Where reports go: ``reports_dir``, else beside the records in ``<results_dir>/reports``."""
        return Path(self.reports_dir) if self.reports_dir else Path(self.results_dir) / "reports"

    def __post_init__(self):
        if self.attention not in ATTENTION:
            raise HarnessError(f"unknown attention {self.attention!r}; choices: {', '.join(ATTENTION)}")
        if self.sdpa_backend not in SDPA_BACKENDS:
            raise HarnessError(f"unknown sdpa_backend {self.sdpa_backend!r}; choices: {', '.join(SDPA_BACKENDS)}")
        if self.attention == "eager" and self.sdpa_backend != "auto":
            raise HarnessError("sdpa_backend pins a kernel of fused attention; it cannot go with attention = eager")
        if self.prop_attn not in PROP_ATTN:
            raise HarnessError(f"unknown prop_attn {self.prop_attn!r}; choices: {', '.join(PROP_ATTN)}")
        if self.attention == "eager" and self.prop_attn != "mask":
            raise HarnessError(f"prop_attn = {self.prop_attn} feeds a fused kernel; eager attention adds the size "
                               f"bias to its own scores (use prop_attn = mask)")
        if self.compile and self.prop_attn == "flex":
            raise HarnessError("prop_attn = flex does not trace inside a compiled model on this torch "
                               "(tests/test_prop_attn.py); use fold with --compile")
        if self.throughput_warmup < -1 or self.throughput_repeats < -1 or self.throughput_repeats == 0:
            raise HarnessError("throughput_warmup must be >= 0 and throughput_repeats >= 1 (-1: the device's default)")


# ``run --quick``: the main job (``--methods all``, the suite's models and budgets) at a size that
# ends in about five minutes on a 2-core CPU. Evaluation (2 images a class), DiffRate's search (its
# steps are calib_limit / batch_size x epochs: 10 here, 100 at the default 400) and the timing
# (the most of a small cell: 3 interleaved rounds, the minimum for a spread, and no batch-1 latency)
# shrink together; a flag given on the command line wins over its value here. limit and calib_limit
# are in a cell's id and limit in the report's environment, so a quick cell is never taken for a full one.
QUICK_RUN = {"limit": 20, "calib_limit": 40, "throughput_warmup": 1, "throughput_repeats": 3,
             "throughput_latency": False}
QUICK_METHODS = ("all",)


@dataclass(frozen=True)
class SuiteConfig:
    """Models x methods x budgets; ``budgets_by_model`` replaces ``budgets`` for the models it names."""

    models: tuple[str, ...] = ()
    methods: tuple[str, ...] = ("all",)
    budgets: tuple[str, ...] = ("0.7",)
    budgets_by_model: dict = field(default_factory=dict)
    method_options: dict = field(default_factory=dict)  # method -> options over [methods.<name>] for this suite
    # off-the-shelf and/or finetune:<recipe> ([recipes.<recipe>]); a fine-tune also plans its off-the-shelf partner
    protocols: tuple[str, ...] = ("off-the-shelf",)

    def budgets_for(self, model: str) -> tuple[str, ...]:
        return self.budgets_by_model.get(model, self.budgets)


@dataclass(frozen=True)
class ModelConfig:
    """A model beyond the reference cards: a timm name plus where its weights and data come from.

    Attributes:
        timm: timm model name, ``arch.tag``.
        weights: ``pretrained`` (timm's, from the local Hugging Face / timm cache), ``random`` (speed
            and GMACs only) or ``checkpoint``; "" means ``checkpoint`` when ``checkpoint`` is set,
            the card's own weights for a ``card``, else ``pretrained``.
        checkpoint: a local .safetensors / .pth file, for any timm architecture (relative paths are
            under the data root).
        num_classes: classifier size; None keeps timm's default (a card's: its own).
        data: ``cifar10``, ``imagenet`` or ``synthetic``; "" means the card's (``cifar10``), else ``imagenet``.
        data_path: folder for ``imagenet`` (the ``val`` folder); "" means the shared sample.
        card: a reference checkpoint to start from (its architecture, classes and input), in place of ``timm``.
    """

    timm: str = ""
    weights: str = ""
    checkpoint: str = ""
    num_classes: Optional[int] = None
    data: str = ""
    data_path: str = ""
    card: str = ""


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    suites: dict = field(default_factory=dict)
    models: dict = field(default_factory=dict)
    method_options: dict = field(default_factory=dict)
    recipes: dict = field(default_factory=dict)  # name -> Recipe ([recipes.<name>])
    path: Optional[Path] = None

    @property
    def suite(self) -> SuiteConfig:
        if self.run.suite not in self.suites:
            from harness.errors import did_you_mean

            raise did_you_mean("suite", self.run.suite, list(self.suites))
        return self.suites[self.run.suite]

    @property
    def suite_method_options(self) -> dict:
        """``[methods.<name>]`` with the running suite's ``method_options`` over it."""
        over = self.suite.method_options
        return {name: {**self.method_options.get(name, {}), **over.get(name, {})}
                for name in dict.fromkeys([*self.method_options, *over])}


def _build(cls, table: Any, where: str):
    if not isinstance(table, dict):
        raise HarnessError(f"{where}: expected a table, got {type(table).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in table.items():
        if key not in fields:
            raise HarnessError(f"{where}: unknown key {key!r}; known keys: {', '.join(fields)}")
        default = fields[key].default
        expected = type(default) if default not in (None, dataclasses.MISSING) else None
        if isinstance(default, tuple):
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list):
                raise HarnessError(f"{where}.{key}: expected a list, got {value!r}")
            table = {**table, key: tuple(str(v) for v in value)}
        elif expected is float and isinstance(value, int) and not isinstance(value, bool):
            table = {**table, key: float(value)}  # TOML's 5 for a float setting (warmup_epochs = 5)
        elif expected is not None and not isinstance(value, expected) or isinstance(value, bool) and expected is int:
            raise HarnessError(f"{where}.{key}: expected {expected.__name__}, got {value!r}")
    try:
        return cls(**table)
    except HarnessError as exc:
        raise HarnessError(f"{where}: {exc}") from None


def _suite(table: Any, where: str) -> SuiteConfig:
    by_model = table.get("budgets_by_model", {}) if isinstance(table, dict) else {}
    if not isinstance(by_model, dict) or not all(isinstance(v, list) for v in by_model.values()):
        raise HarnessError(f"{where}.budgets_by_model: expected a table of model = [budgets]")
    options = table.get("method_options", {}) if isinstance(table, dict) else {}
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
        raise HarnessError(f"{where}.method_options: expected tables [suites.<suite>.method_options.<method>]")
    suite = _build(SuiteConfig, {k: v for k, v in table.items() if k not in ("budgets_by_model", "method_options")}, where)
    return dataclasses.replace(suite, budgets_by_model={k: tuple(str(b) for b in v) for k, v in by_model.items()},
                               method_options=options)


def load_config(path: Path) -> Config:
    """Read and validate ``benchmark.toml``; any problem raises a HarnessError naming line or key."""
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise HarnessError(f"{path}: malformed TOML: {exc}") from None
    except UnicodeDecodeError:
        raise HarnessError(f"{path}: not a UTF-8 text file") from None
    known = {"run", "suites", "models", "methods", "recipes"}
    for key in data:
        if key not in known:
            raise HarnessError(f"{path}: unknown section [{key}]; known: {', '.join(sorted(known))}")
    run = _build(RunConfig, data.get("run", {}), f"{path.name} [run]")
    suites = {k: _suite(v, f"{path.name} [suites.{k}]") for k, v in data.get("suites", {}).items()}
    models = {k: _build(ModelConfig, v, f"{path.name} [models.{k}]") for k, v in data.get("models", {}).items()}
    methods = data.get("methods", {})
    for name, opts in methods.items():
        if not isinstance(opts, dict):
            raise HarnessError(f"{path.name} [methods.{name}]: expected a table of options")
    recipes = {k: _build(Recipe, v, f"{path.name} [recipes.{k}]") for k, v in data.get("recipes", {}).items()}
    return Config(run=run, suites=suites, models=models, method_options=methods, recipes=recipes, path=path)
