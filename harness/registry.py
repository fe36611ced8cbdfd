"""Method plugins: the contract, the registry, and discovery.

A method is one file in ``methods/`` (installed as ``harness.methods``) that subclasses
:class:`Method` and decorates it with :func:`register_method`. Outside packages register through the
``harness.methods`` entry-point group (``[project.entry-points."harness.methods"] mine =
"mypkg.mymethod"``). The harness itself is never edited to add a method.

The registry is lazy: names, knobs and descriptions are read from the modules' source with
``ast``, so ``python -m harness ls methods`` imports no torch; a method's module is imported (and
its decorator runs) only when the method is made.
"""
from __future__ import annotations

import abc
import ast
import copy
import dataclasses
import importlib
import importlib.util
import logging
import pkgutil
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

from harness.errors import HarnessError, did_you_mean

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "harness.methods"


@dataclass(frozen=True)
class Knob:
    """A method's native compression knob.

    Attributes:
        name: the name users write in budgets (``r=13``, ``keep_rate=0.7``).
        kind: ``int`` or ``float``.
        low, high: the valid range, both ends included.
        identity: the value that removes nothing (the unpatched model).
    """

    name: str
    kind: type
    low: float
    high: float
    identity: float

    def check(self, value: float) -> float:
        """Return ``value`` cast to the knob's kind, or raise a HarnessError if out of range."""
        if self.kind is int and float(value) != int(value):
            raise HarnessError(f"{self.name} must be an integer, got {value}")
        if not self.low <= value <= self.high:
            raise HarnessError(f"{self.name}={value} out of range [{self.low}, {self.high}]")
        return self.kind(value)


@dataclass(frozen=True)
class Premises:
    """What a method assumes of a model, declared once on the class (``premises = Premises(...)``).

    The harness passes them to the seam when it installs the method's reducers, so a model that
    cannot give them is ``unsupported`` before any work; the seam also checks each where it is
    used, declared or not (:mod:`harness.seam.premises`), and ``tests/test_premises_at_use.py``
    asserts that what a method declares equals what it is seen to need.

    Attributes:
        needs_class_token: tokens are ranked by the class token's attention (``ctx.cls_attn()``).
        merges: tokens are merged (they carry sizes): the head's pooling must weigh tokens by size.
        tracks_positions: the reducers keep each token's original position in sync
            (``harness.seam.keep_tokens`` / ``merge_positions``), so rope / relative-position models run.
    """

    needs_class_token: bool = False
    merges: bool = False
    tracks_positions: bool = False


@dataclass(frozen=True)
class NoOptions:
    """The options of a method that has none."""


@dataclass(frozen=True)
class Calibrated:
    """What :meth:`Method.calibrate` returns: the searched state and the record fields about the search.

    Attributes:
        state: what :meth:`Method.schedule` and :meth:`Method.reducers` need of the search (e.g.
            DiffRate's kept counts); the harness binds it to a copy of the method
            (:meth:`Method.with_calibration`), never to the instance that searched.
        fields: added to the cell's record (``search_s``, ``search_images``, ``search_cached``, ...).
    """

    state: object = None
    fields: dict = dataclasses.field(default_factory=dict)


class Method(abc.ABC):
    """The plugin contract: what a method is, how many tokens each block keeps, and what reduces them.

    Eight names make a method (``docs/adding-a-method.md``): ``name``, ``version``, ``knob``,
    ``Options`` (a frozen dataclass of the options with their defaults, typed), ``premises``
    (:class:`Premises`), ``stage`` (where in the block the reducers run), :meth:`schedule` (tokens
    leaving each block at a knob value) and :meth:`reducers` (a reducer per block). The harness
    installs the reducers at the seam, reading ``stage``, ``premises`` and ``prop_attn`` from the
    class; the first line of the class docstring is what ``python -m harness ls methods`` shows.

    Optional, each with a default: :meth:`follow` (reducers for another method's schedule, for
    ``random@tome``), :meth:`calibrate` (a search on data before the schedule is known; returns
    :class:`Calibrated`), ``prop_attn``, :meth:`describe`, the fine-tuning hooks (``cannot_train``,
    :meth:`train_knob`, :meth:`set_train_knob`, :meth:`training_identity`), ``baseline``, and
    :meth:`patch` for a method that changes the model itself rather than its tokens (``resolution``).
    """

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    knob: ClassVar[Optional[Knob]] = None
    Options: ClassVar[type] = NoOptions
    premises: ClassVar[Premises] = Premises()
    # where in each block the reducers run (harness.seam.STAGES): "mid" between attention and MLP,
    # "pre" before the attention (MCTF), "post" after the MLP (DCT); schedules carry the same stage
    stage: ClassVar[str] = "mid"
    # a merging method's attention adds log(token size) to its logits (ToMe's proportional attention)
    prop_attn: ClassVar[bool] = False
    # the reducers read the block's whole attention map (ctx.attention()) in every reducing block: the block
    # forms it once, explicitly, and hands it over, instead of a fused kernel and a second q k^T (GTP-ViT)
    attention_map: ClassVar[bool] = False
    needs_calibration: ClassVar[bool] = False
    # a reference line every other method must beat (``resolution``): drawn and listed as such
    baseline: ClassVar[bool] = False
    # options the cell ids stored before the harness filled defaults in left out at these values (their
    # defaults then): hashed only when different, so those ids stay; a new method leaves it empty
    implicit_defaults: ClassVar[dict] = {}
    # fine-tuning (the ``finetune:<recipe>`` protocol, :mod:`harness.training.finetune`): None when the method's
    # reducers train as they run (its paper fine-tunes with them in place); else why it cannot be
    # fine-tuned here, and its fine-tune cells are ``unsupported`` with that reason
    cannot_train: ClassVar[Optional[str]] = "it declares no fine-tuning (Method.cannot_train is not set to None)"
    # a method that is defined only once fine-tuned (its modules are learned: DynamicViT's predictors):
    # why, and its off-the-shelf cells are ``unsupported`` with "<name> needs training: <reason>"
    needs_training: ClassVar[Optional[str]] = None
    calibration: object = None  # the state bound by with_calibration (None until a search is bound)
    # a first-contract plugin's ``patch_schedule`` (read by _adopt_legacy_declarations; kept for one release)
    legacy_patch_schedule: ClassVar[Optional[object]] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _adopt_legacy_declarations(cls)

    def __init__(self, **options):
        self.given_options = dict(options)  # as the config wrote them (the calibration cache's key)
        self.options = resolve_options(self.name, self.Options, options)

    @classmethod
    def option_names(cls) -> list[str]:
        """Options a config may set for this method (``[methods.<name>]`` in benchmark.toml)."""
        return [f.name for f in dataclasses.fields(cls.Options)]

    @classmethod
    def option_defaults(cls) -> dict:
        """Each option's default, as declared in ``Options``."""
        return {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
                for f in dataclasses.fields(cls.Options)
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}

    @abc.abstractmethod
    def schedule(self, arch, value) -> "Schedule":  # noqa: F821
        """Tokens leaving each block at knob ``value`` for a model of shape ``arch`` (an ArchSpec)."""

    def reducers(self, model, arch, value) -> dict:
        """Block index -> reducer ``(x, ctx) -> x`` at knob ``value``, for a fresh ``model`` of shape ``arch``.

        Only blocks that reduce get one (at the identity knob: none). The harness installs them
        (:meth:`patch`); a method that changes the model itself overrides :meth:`patch` instead.
        """
        raise NotImplementedError(f"method {self.name!r} defines neither reducers() nor patch()")

    def follow(self, model, arch, schedule: "Schedule") -> dict:  # noqa: F821
        """Reducers that reduce to any ``schedule`` (another method's): what ``follower@leader`` installs.

        A method that can follow overrides this; the default refuses.
        """
        raise HarnessError(f"method {self.name!r} cannot follow another method's schedule (no follow())")

    def patch(self, model, value, arch) -> None:
        """Install :meth:`reducers` on ``model`` (fresh, unpatched, eval mode), with the class's declarations."""
        self.install(model, self.reducers(model, arch, value))

    def install(self, model, reducers: dict, stage: Optional[str] = None) -> None:
        """Install ``reducers`` at the seam with this method's stage, premises and proportional attention."""
        from harness.seam import install

        p = self.premises
        install(model, reducers, prop_attn=bool(self.prop_attn), needs_class_token=p.needs_class_token,
                merges=p.merges, method=self.name, stage=stage or self.stage, tracks_positions=p.tracks_positions,
                attention_map=self.attention_map)

    def resolved_options(self) -> dict:
        """Every option that changes results, defaults filled in, each in its default's type (``1`` for
        a float default is ``1.0``, a tuple a list): what :meth:`identity_options` hashes.

        A method overrides this only to leave out options that do not change its results in some mode
        (DiffRate's search settings when it reads published schedules).
        """
        return {k: canonical_option(v, v) for k, v in dataclasses.asdict(self.options).items()}

    def identity_options(self) -> dict:
        """The options in a cell's id: :meth:`resolved_options` less those at :attr:`implicit_defaults`."""
        implicit = self.implicit_defaults
        return {k: v for k, v in self.resolved_options().items()
                if not (k in implicit and _same_value(v, canonical_option(implicit[k], implicit[k])))}

    def describe(self, arch, value) -> dict:
        """Record fields about how the schedule at ``value`` was obtained (its source); none by default."""
        return {}

    def train_knob(self, value, done: float):
        """The knob while the fraction ``done`` (0..1) of a fine-tune has run: ``value`` throughout by
        default; EViT warms its keep rate up from 1 (:meth:`set_train_knob` then sets it)."""
        return value

    def set_train_knob(self, model, value) -> None:
        """Set a patched model's knob during training; only a method whose :meth:`train_knob` varies needs it."""
        raise HarnessError(f"method {self.name!r} cannot change its knob while training (no set_train_knob)")

    def training_loss(self, model, step) -> Optional["torch.Tensor"]:  # noqa: F821
        """A loss added to the recipe's loss at each fine-tuning update; None (nothing) by default.

        Args:
            model: the patched model being trained (unwrapped from DDP), after its forward on the batch.
            step: a :class:`harness.training.finetune.TrainingStep`: the batch's images, the model's logits,
                and the teacher's logits and final tokens (None without a teacher in the recipe).

        DynamicViT adds its keep-ratio, token-distillation and logit-KL losses here.
        """
        return None

    def training_identity(self) -> dict:
        """What of the method's training (beyond its options) enters a fine-tune cell's id; none by default."""
        return {}

    @property
    def can_follow(self) -> bool:
        """Whether the method overrides :meth:`follow` (``random@tome`` needs it of ``random``)."""
        return type(self).follow is not Method.follow or self.legacy_patch_schedule is not None

    def calibrate(self, model, value, arch, calibration) -> Calibrated:
        """The search before the schedule is known, run when ``needs_calibration`` is set (DiffRate).

        Args:
            model: the unpatched model, on the run's device, in eval mode (a fresh one is patched after).
            value: the knob value the search is for.
            arch: the model's ArchSpec.
            calibration: a :class:`harness.sweep.calibration.Calibration`, the harness's service: training
                images (``train``), ``device``, ``dtype``, a ``key`` naming weights and data, a cache
                (``cached(name)``, ``store(name, found)``) and progress (``report``).

        Returns:
            :class:`Calibrated`: the state the schedule and reducers read (the harness binds it to a
            copy of the method, :meth:`with_calibration`) and the fields added to the cell's record.
        """
        return Calibrated()

    def with_calibration(self, state) -> "Method":
        """A copy of this method that reads ``state`` (what :meth:`calibrate` found) as ``self.calibration``."""
        bound = copy.copy(self)
        bound.calibration = state
        return bound

    def calibration_identity(self) -> dict:
        """What of the method makes its search's result: part of the calibration key.

        The options as written (not filled in), as caches stored before defaults were filled are keyed.
        """
        return {"method_version": self.version, "options": self.given_options}

    @property
    def cache_name(self) -> str:
        """Folder name of this method's calibration cache (shared by methods that follow it)."""
        return self.name

    @classmethod
    def description(cls) -> str:
        """The first line of the class docstring: what ``python -m harness ls methods`` shows."""
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""


def canonical_option(default, value):
    """``value`` in the type of ``default`` where that loses nothing (``1`` -> ``1.0`` for a float
    default, a tuple -> a list), so two spellings of one setting hash alike; else ``value`` as given."""
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(default, bool) or isinstance(value, bool):
        return value
    if isinstance(default, float) and isinstance(value, (int, float)):
        return float(value)
    if isinstance(default, int) and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _same_value(a, b) -> bool:
    """Equal and of one kind: ``True`` is not ``1`` here, as JSON (the id's hash) tells them apart."""
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def resolve_options(method: str, options_cls: type, given: dict):
    """``options_cls`` (a method's ``Options`` dataclass) filled from ``given``: unknown names, values of
    the wrong type and the dataclass's own checks (``__post_init__``) raise one clear HarnessError."""
    names = [f.name for f in dataclasses.fields(options_cls)]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise HarnessError(f"method {method!r} has no option(s) {unknown}; options: {names}")
    hints = typing.get_type_hints(options_cls)
    values = {k: _typed(method, k, hints.get(k), v) for k, v in given.items()}
    try:
        return options_cls(**values)
    except (TypeError, ValueError) as exc:
        raise HarnessError(f"method {method!r}: {exc}") from exc


def _typed(method: str, key: str, hint, value):
    """``value`` as option ``key``'s declared type ``hint`` (int from 2.0, float from 2, tuple from a list)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    base = typing.get_origin(hint) or hint
    if base in (tuple, list) and isinstance(value, (tuple, list)):
        item = args[0] if args else None
        return tuple(_typed(method, key, item, v) for v in value)
    cast = _CASTS.get(base)
    if base in (None, object, typing.Any) or (cast is None and isinstance(value, base)):
        return value
    if cast is not None and cast[0](value):
        return cast[1](value)
    raise HarnessError(f"method {method!r}: option {key} must be {getattr(base, '__name__', base)}, got {value!r}")


# declared type -> (accepts, cast): 2.0 is an int, 2 a float; a bool is neither
_CASTS = {
    bool: (lambda v: isinstance(v, bool), bool),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool) or isinstance(v, float) and v.is_integer(), int),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), float),
    str: (lambda v: isinstance(v, str), str),
}


def _adopt_legacy_declarations(cls) -> None:
    """A plugin written for the first contract (``option_defaults``, the premises as three booleans)
    still loads: its declarations are read into ``Options`` and ``premises``. Kept for one release."""
    body = vars(cls)
    if isinstance(body.get("option_defaults"), dict) and "Options" not in body:
        defaults = body["option_defaults"]
        fields = [(k, object if v is None else type(v), dataclasses.field(default=tuple(v) if isinstance(v, list) else v))
                  for k, v in defaults.items()]
        cls.Options = dataclasses.make_dataclass(f"{cls.__name__}Options", fields, frozen=True)
        delattr(cls, "option_defaults")
    legacy = {k: body[k] for k in ("needs_class_token", "merges", "tracks_positions") if isinstance(body.get(k), bool)}
    if legacy and "premises" not in body:
        cls.premises = dataclasses.replace(cls.premises, **legacy)
    if callable(body.get("patch_schedule")):
        cls.legacy_patch_schedule = body["patch_schedule"]


_REGISTRY: dict[str, type[Method]] = {}


@dataclass(frozen=True)
class MethodInfo:
    """What ``ls methods`` shows of a method, read from its source without importing it.

    Attributes:
        name: the registry key.
        knob: the knob's name, "" for a method without one.
        description: the first line of the class docstring.
        module: the module that registers the class; imported only when the method is made.
        baseline: the class sets ``baseline = True`` (a reference line, ``resolution``).
    """

    name: str
    knob: str
    description: str
    module: str
    baseline: bool = False


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: add a Method subclass to the registry under ``cls.name``."""
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"method name {cls.name!r} registered twice ({existing.__module__}, {cls.__module__})")
    _REGISTRY[cls.name] = cls
    return cls


def _builtin_modules() -> list[tuple[str, Path]]:
    """(module name, source file) of every module under ``harness.methods`` (a method may be a package)."""
    import harness.methods

    found = []
    for folder in map(Path, harness.methods.__path__):
        for source in sorted(folder.rglob("*.py")):
            parts = source.relative_to(folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            if parts and not any(part.startswith("_") for part in parts):
                found.append(("harness.methods." + ".".join(parts), source))
    return found


def _entry_point_modules() -> list[tuple[str, Optional[Path]]]:
    """(module name, source file) of each ``harness.methods`` entry point; a broken one is logged and left out."""
    from importlib.metadata import entry_points

    found = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        module = ep.value.partition(":")[0].strip()
        try:
            spec = importlib.util.find_spec(module)
        except Exception as exc:  # a broken outside plugin must not take the harness down
            spec, why = None, exc
        else:
            why = f"no module named {module!r}"
        if spec is None:
            log.warning("could not load method plugin %s (%s): %s", ep.name, ep.value, why)
            continue
        origin = Path(spec.origin) if spec.origin and spec.origin.endswith(".py") else None
        found.append((module, origin))
    return found


def _literal(node: ast.expr):
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, RecursionError):
        return _UNREAD


_UNREAD = object()  # an attribute the source sets to something ``ast.literal_eval`` cannot read


def _read_class(node: ast.ClassDef) -> dict:
    """The class attributes ``ls`` and reports need, as written in the class body (``_UNREAD`` where not a literal)."""
    attrs = {"bases": [b.id for b in node.bases if isinstance(b, ast.Name)], "doc": ast.get_docstring(node) or "",
             "registered": any(isinstance(d, ast.Name) and d.id == "register_method" for d in node.decorator_list)}
    for stmt in node.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            target, value = stmt.targets[0].id, stmt.value
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
            target, value = stmt.target.id, stmt.value
        else:
            continue
        if target == "name":
            attrs["name"] = _literal(value)
        elif target == "baseline":
            attrs["baseline"] = _literal(value)
        elif target == "knob":
            is_knob = isinstance(value, ast.Call) and getattr(value.func, "id", None) == "Knob" and value.args
            attrs["knob"] = "" if _literal(value) is None else _literal(value.args[0]) if is_knob else _UNREAD
    return attrs


def _inherited(classes: dict, cls: dict, key: str):
    """``cls[key]``, else the first base's that sets it (bases found by name); "" once ``Method`` is reached."""
    if key in cls:
        return cls[key]
    for base in cls["bases"]:
        if base == "Method":
            return ""
        if base in classes:
            return _inherited(classes, classes[base], key)
    return _UNREAD


def _read_sources(modules: list[tuple[str, Optional[Path]]]) -> tuple[list[MethodInfo], list[str]]:
    """Method infos read from the modules' source; the modules whose methods cannot be read so are returned apart."""
    parsed, unreadable = [], []
    for module, source in modules:
        try:
            tree = ast.parse(source.read_text(), str(source)) if source else None
        except (OSError, SyntaxError, UnicodeDecodeError):
            tree = None
        if tree is None:
            unreadable.append(module)
            continue
        parsed.append((module, {n.name: _read_class(n) for n in tree.body if isinstance(n, ast.ClassDef)}))
    classes = {name: attrs for _, found in parsed for name, attrs in found.items()}
    infos = []
    for module, found in parsed:
        for attrs in (a for a in found.values() if a["registered"]):
            name, knob = attrs.get("name", _UNREAD), _inherited(classes, attrs, "knob")
            baseline = _inherited(classes, attrs, "baseline")
            if not isinstance(name, str) or not isinstance(knob, str) or baseline not in ("", True, False):
                unreadable.append(module)
                break
            infos.append(MethodInfo(name, knob, attrs["doc"].strip().splitlines()[0] if attrs["doc"] else "", module,
                                    baseline is True))
    return infos, unreadable


def _info_of(cls: type[Method]) -> MethodInfo:
    return MethodInfo(cls.name, cls.knob.name if cls.knob else "", cls.description(), cls.__module__, bool(cls.baseline))


_catalog: dict[str, MethodInfo] = {}


def _discover() -> dict[str, MethodInfo]:
    """Every method, built-in and outside, by name; filled once per process from the sources.

    Reading the sources (``ast``) rather than importing them keeps ``ls methods`` free of torch; a
    module whose name or knob is not written as a literal is imported instead.
    """
    if _catalog:
        return _catalog
    infos, unreadable = _read_sources(_builtin_modules() + _entry_point_modules())
    for module in unreadable:
        try:
            importlib.import_module(module)
        except Exception as exc:  # a broken outside plugin must not take the harness down
            log.warning("could not load method plugin module %s: %s", module, exc)
        infos += [_info_of(cls) for cls in _REGISTRY.values() if cls.__module__ == module]
    for info in infos:
        existing = _catalog.setdefault(info.name, info)
        if existing != info:
            raise ValueError(f"method name {info.name!r} registered twice ({existing.module}, {info.module})")
    return _catalog


def method_infos() -> list[MethodInfo]:
    """Name, knob and description of every method (built-in, outside, registered in this process), by name."""
    found = {**_discover(), **{n: _info_of(c) for n, c in _REGISTRY.items() if n not in _discover()}}
    return [found[n] for n in sorted(found)]


def method_names() -> list[str]:
    """Names of all methods, sorted; none of their modules is imported."""
    return sorted(set(_discover()) | set(_REGISTRY))


def check_method_names(names) -> None:
    """Raise "unknown method ...; did you mean" for a name no method has, importing none (no torch).

    ``all`` and both sides of ``follower@leader`` are accepted; whether a follower can follow is
    checked when the method is built (:func:`make_method`).
    """
    known = method_names()
    for name in names:
        for part in name.split("@") if name != "all" else ():
            if part not in known:
                raise did_you_mean("method", part, known)


def get_method_class(name: str) -> type[Method]:
    """The registered class for ``name``, importing its module now; an unknown name raises with "did you mean"."""
    if name not in _REGISTRY and name in _discover():
        module = _discover()[name].module
        try:
            importlib.import_module(module)
        except ImportError as exc:  # an outside plugin's missing dependency: one clear line, not a traceback
            raise HarnessError(f"method {name!r}: importing {module} failed: {exc}") from exc
    if name not in _REGISTRY:
        raise did_you_mean("method", name, method_names())
    return _REGISTRY[name]


class FollowSchedule(Method):
    """``follower@leader``: the follower's token selection at the leader's schedule (e.g. random@tome)."""

    name = "follow"

    def __init__(self, follower: Method, leader: Method):
        self.follower, self.leader = follower, leader
        self.name = f"{follower.name}@{leader.name}"
        self.version = f"{follower.version}@{leader.version}"
        self.knob = leader.knob
        self.options = {follower.name: follower.options, leader.name: leader.options}
        self.given_options = {follower.name: follower.given_options, leader.name: leader.given_options}

    @property
    def needs_calibration(self) -> bool:
        return self.leader.needs_calibration

    @property
    def cache_name(self) -> str:
        return self.leader.cache_name

    @property
    def cannot_train(self) -> Optional[str]:
        return self.follower.cannot_train  # the follower's selection trains at the leader's fixed schedule

    @property
    def needs_training(self) -> Optional[str]:
        return self.follower.needs_training  # the leader's schedule is analytic; the selection is the follower's

    def resolved_options(self) -> dict:
        return {self.follower.name: self.follower.resolved_options(), self.leader.name: self.leader.resolved_options()}

    def identity_options(self) -> dict:
        return {self.follower.name: self.follower.identity_options(), self.leader.name: self.leader.identity_options()}

    def calibrate(self, model, value, arch, calibration) -> Calibrated:
        return self.leader.calibrate(model, value, arch, calibration)

    def calibration_identity(self) -> dict:
        return self.leader.calibration_identity()  # random@diffrate reuses diffrate's own search

    def describe(self, arch, value) -> dict:
        return self.leader.describe(arch, value)

    @property
    def stage(self) -> str:
        return self.follower.stage

    @property
    def premises(self) -> Premises:
        return self.follower.premises

    @property
    def prop_attn(self) -> bool:
        return self.follower.prop_attn

    @property
    def attention_map(self) -> bool:
        return self.follower.attention_map

    def with_calibration(self, state) -> "FollowSchedule":
        return FollowSchedule(self.follower, self.leader.with_calibration(state))

    def schedule(self, arch, value):
        # the leader's token counts, paid for where the follower reduces (random@dct prunes between
        # attention and MLP at DCT's counts: its GMACs are those of a "mid" schedule), without the
        # leader's own modules (DynamicViT's predictors), which the follower does not run
        return dataclasses.replace(self.leader.schedule(arch, value), stage=self.follower.stage, extra_macs=0.0)

    def patch(self, model, value, arch) -> None:
        schedule = self.schedule(arch, value)
        legacy = self.follower.legacy_patch_schedule
        if legacy is not None and type(self.follower).follow is Method.follow:  # a plugin of the first contract
            return legacy(model, schedule)  # bound: it was the class's own method
        self.follower.install(model, self.follower.follow(model, arch, schedule))


def make_method(name: str, options: Optional[dict] = None) -> Method:
    """A method instance by name, with ``options[name]`` from the config.

    ``follower@leader`` (e.g. ``random@tome``) builds the follower at the leader's schedule, for
    "random pruning at the schedule of method X"; the follower must override :meth:`Method.follow`.
    """
    options = options or {}
    follower, sep, leader = name.partition("@")
    if not sep:
        return get_method_class(name)(**options.get(name, {}))
    f, lead = make_method(follower, options), make_method(leader, options)
    if not f.can_follow:
        raise HarnessError(f"method {follower!r} cannot follow another method's schedule (it defines no follow())")
    if lead.knob is None:
        raise HarnessError(f"method {leader!r} has no knob, so no schedule to follow")
    if lead.baseline:
        raise HarnessError(f"method {leader!r} is a baseline that changes the model's input, not the tokens inside its "
                           f"blocks: there is no token schedule for {follower!r} to follow")
    return FollowSchedule(f, lead)
