"""Models: the reference checkpoints' cards, timm names (``arch.tag``) and local checkpoint files."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from harness.config import ModelConfig
from harness.errors import HarnessError, did_you_mean
from harness.paths import require_file

log = logging.getLogger(__name__)

DATA_SOURCES = ("cifar10", "imagenet", "synthetic")


@dataclass(frozen=True)
class Transform:
    """The eval input: resize to ``img_size`` then normalise. ``crop_pct`` None means stretch, no crop."""

    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: Optional[float] = None
    interpolation: str = "bilinear"


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build one model and feed it."""

    name: str
    arch: str
    weights: str  # checkpoint | pretrained | random
    checkpoint: Optional[Path]
    num_classes: Optional[int]
    data: str
    data_path: str = ""
    card_transform: Optional[Transform] = None
    card_top1: Optional[float] = None


def _card_spec(card_path: Path) -> ModelSpec:
    try:
        card = json.loads(card_path.read_text())
        t = Transform(int(card["img_size"]), tuple(card["mean"]), tuple(card["std"]))
        ckpt = card_path.parent / card.get("files", [card_path.stem + ".safetensors"])[0]
        return ModelSpec(card["name"], card["arch"], "checkpoint", ckpt, int(card["num_classes"]), "cifar10",
                         card_transform=t, card_top1=card.get("test_top1_fp16_weights"))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise HarnessError(f"model card {card_path} is malformed: {exc}") from None


def reference_names(root: Path) -> list[str]:
    """Names of the reference checkpoints (cards in ``<root>/models``)."""
    return sorted(p.stem for p in (root / "models").glob("*.json"))


def resolve_model(name: str, configured: dict[str, ModelConfig], root: Path) -> ModelSpec:
    """A model by name: a ``[models.X]`` entry, a reference card, or a timm name with pretrained weights."""
    if name in configured:
        return _configured_spec(name, configured[name], root)
    card = root / "models" / f"{name}.json" if _has_root(root) else None
    if card is not None and card.is_file():
        return _card_spec(card)
    import timm

    if timm.is_model(name.split(".")[0]):
        return ModelSpec(name, name, "pretrained", None, None, "imagenet")
    choices = list(configured) + (reference_names(root) if _has_root(root) else []) + timm.list_models("*vit*") + timm.list_models("deit*")
    raise did_you_mean("model", name, choices)


def _has_root(root) -> bool:
    return root.available() if hasattr(root, "available") else True


def _configured_spec(name: str, mc: ModelConfig, root: Path) -> ModelSpec:
    if mc.weights not in ("pretrained", "random", "checkpoint"):
        raise HarnessError(f"[models.{name}] weights must be pretrained, random or checkpoint, got {mc.weights!r}")
    if mc.data not in DATA_SOURCES:
        raise HarnessError(f"[models.{name}] data must be one of {', '.join(DATA_SOURCES)}, got {mc.data!r}")
    ckpt = None
    if mc.weights == "checkpoint":
        ckpt = Path(mc.checkpoint).expanduser()
        ckpt = ckpt if ckpt.is_absolute() else root / ckpt
    if mc.weights == "random" and mc.data != "synthetic":
        raise HarnessError(f"[models.{name}] random weights give meaningless accuracy: use data = \"synthetic\"")
    return ModelSpec(name, mc.timm, mc.weights, ckpt, mc.num_classes, mc.data, mc.data_path)


def _read_state_dict(path: Path) -> dict:
    require_file(path, "checkpoint")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        import torch

        sd = torch.load(path, map_location="cpu", weights_only=True)
        return sd.get("model", sd.get("state_dict", sd)) if isinstance(sd, dict) else sd
    except Exception as exc:
        raise HarnessError(f"checkpoint {path} is unreadable or corrupt: {type(exc).__name__}: {exc}".splitlines()[0]) from None


def build_model(spec: ModelSpec, state_dict: Optional[dict] = None):
    """A fresh timm model in eval mode with the spec's weights (``state_dict`` reuses a loaded one)."""
    import timm

    kwargs = {} if spec.num_classes is None else {"num_classes": spec.num_classes}
    pretrained = spec.weights == "pretrained"
    if spec.weights == "random" and state_dict is not None:
        model = _build_from_random_weights(spec, state_dict, kwargs)
        if model is not None:
            return model
    if spec.weights == "random":
        import torch

        torch.manual_seed(0)  # the same random weights in every process and run
    try:
        model = timm.create_model(spec.arch, pretrained=pretrained, **kwargs)
    except Exception as exc:
        why = "pretrained weights could not be had (no network here?)" if pretrained else "could not be built"
        raise HarnessError(f"model {spec.name} ({spec.arch}): {why}: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    if spec.weights == "checkpoint":
        sd = state_dict if state_dict is not None else _read_state_dict(spec.checkpoint)
        try:
            model.load_state_dict(sd)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0:2]
            raise HarnessError(f"checkpoint {spec.checkpoint} does not fit {spec.arch}: {' '.join(first)}") from None
    return model.eval()


def _build_from_random_weights(spec: ModelSpec, state_dict: dict, kwargs: dict):
    """The random-weight model again without timm's init (seconds for ViT-H): built on the meta
    device, then given ``state_dict``; None when the model has buffers the state dict lacks."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(spec.arch, pretrained=False, **kwargs)
    if {name for name, _ in model.named_buffers()} - set(state_dict):
        return None
    model = model.to_empty(device="cpu")
    model.load_state_dict(state_dict)
    return model.eval()


def load_checkpoint(spec: ModelSpec) -> Optional[dict]:
    """The spec's weights, read and checked once so that a corrupt file fails early.

    A checkpoint's state dict; for random weights the seeded init's (later cells of the same model
    copy it instead of initialising again); None for timm's pretrained weights.
    """
    if spec.weights == "random":
        return build_model(spec).state_dict()
    if spec.weights != "checkpoint":
        return None
    sd = _read_state_dict(spec.checkpoint)
    build_model(spec, sd)  # wrong-architecture files fail here, before any cell runs
    return sd


def checkpoint_sha(spec: ModelSpec) -> Optional[str]:
    """First 16 hex digits of the checkpoint's sha256 (part of a cell's identity)."""
    if spec.checkpoint is None:
        return None
    return hashlib.sha256(spec.checkpoint.read_bytes()).hexdigest()[:16]


def eval_transform(spec: ModelSpec, model) -> Transform:
    """The card's transform, else the model's own pretrained config (never hard-coded)."""
    if spec.card_transform is not None:
        return spec.card_transform
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    return Transform(int(cfg["input_size"][-1]), tuple(cfg["mean"]), tuple(cfg["std"]),
                     float(cfg.get("crop_pct", 1.0)), cfg.get("interpolation", "bicubic"))
