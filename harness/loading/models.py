"""Models: the reference checkpoints' cards, timm names (``arch.tag``) and local checkpoint files.

Weights come from one of three places, none of which needs a network:

- ``random``: timm's init, seeded (speed and GMACs only);
- ``checkpoint``: a local ``.safetensors`` / ``.pth`` file, for any timm architecture, read with
  timm's ``load_state_dict`` (EMA / ``model`` / ``state_dict`` keys, DDP prefixes) and loaded through
  timm's ``load_pretrained`` with the architecture's own checkpoint filter (position-embedding
  resampling, original-format conversion), strictly: a file of another architecture fails by name;
- ``pretrained``: timm's weights for ``arch.tag``, from the local Hugging Face cache ($HF_HUB_CACHE,
  else $HF_HOME/hub, else ~/.cache/huggingface/hub) or timm's old torch-hub cache; only when neither
  has them and $HF_HUB_OFFLINE is not set does timm try to download them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from harness.sweep.config import ModelConfig
from harness.errors import HarnessError, did_you_mean
from harness.paths import require_file

log = logging.getLogger(__name__)

DATA_SOURCES = ("cifar10", "imagenet", "synthetic")
WEIGHTS = ("pretrained", "random", "checkpoint")
# ``<timm arch>.random``: the architecture with seeded random weights on synthetic inputs, the same in a
# config file's ``models`` as on the command line (no ``[models.X]`` entry needed)
RANDOM_TAG = "random"


@dataclass(frozen=True)
class Transform:
    """The eval input, as timm's ``resolve_data_config`` gives it.

    ``crop_pct`` set: timm's eval pipeline (``create_transform``: resize the short side to
    ``img_size / crop_pct``, ``crop_mode`` crop to ``img_size``), then normalise. ``crop_pct`` None:
    the reference cards' input, a bilinear stretch of the whole image to ``img_size``, no crop.
    """

    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: Optional[float] = None
    interpolation: str = "bilinear"
    crop_mode: str = "center"


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


def _card_path(name: str, root) -> Optional[Path]:
    card = root / "models" / f"{name}.json" if _has_root(root) else None
    return card if card is not None and card.is_file() else None


def resolve_model(name: str, configured: dict[str, ModelConfig], root: Path) -> ModelSpec:
    """A model by name: a ``[models.X]`` entry, a reference card, or a timm name with pretrained weights."""
    if name in configured:
        return _configured_spec(name, configured[name], root)
    card = _card_path(name, root)
    if card is not None:
        return _card_spec(card)
    import timm

    arch, _, tag = name.partition(".")
    if timm.is_model(arch):
        if tag == RANDOM_TAG:
            return ModelSpec(name, arch, "random", None, None, "synthetic")
        _check_pretrained_tag(name)
        return ModelSpec(name, name, "pretrained", None, None, "imagenet")
    if not _has_root(root):  # a reference checkpoint's name with no data root: say that, not 400 timm names
        why = "no data root"
        try:
            root.path() if hasattr(root, "path") else None
        except HarnessError as exc:
            why = str(exc)
        raise HarnessError(f"unknown model {name!r}: not a timm model, and no reference card "
                           f"<data root>/models/{name}.json can be looked for ({why})")
    raise _unknown_model(name, list(configured) + reference_names(root))


# timm modules whose models are built of the block families the seam patches (seam.block_family): the
# names an unknown model is compared with, never levit / mobilevit / maxvit / davit (no such blocks)
VIT_MODULES = ("vision_transformer", "deit", "eva", "beit", "vision_transformer_relpos")


def vit_names() -> list[str]:
    """timm's ViT-family model names (:data:`VIT_MODULES`), sorted, without timm's own test models."""
    import timm

    return sorted({n for module in VIT_MODULES for n in timm.list_models(module=module) if not n.startswith("test_")})


def _unknown_model(name: str, known: list[str]) -> HarnessError:
    """An "unknown model" error with at most five ViT-family names close to ``name`` and where to list them.

    Args:
        name: the name asked for.
        known: configured entries and reference models, offered before timm's names.
    """
    return did_you_mean("model", name, list(dict.fromkeys(known + vit_names())), n=5,
                        listing="python -m harness ls models lists them; "
                                "any timm ViT (vit_*, deit*, eva*, beit*) works too")


def _check_pretrained_tag(name: str) -> None:
    """A timm ``arch.tag`` whose tag timm does not know fails here, by name, not in timm's builder."""
    import timm
    from timm.models import get_pretrained_cfg

    try:
        get_pretrained_cfg(name)
    except RuntimeError:
        arch, _, tag = name.partition(".")
        tags = [t.partition(".")[2] for t in timm.list_pretrained(f"{arch}.*")]
        raise HarnessError(f"unknown model {name!r}: timm has no pretrained tag {tag!r} for {arch} (its tags: "
                           f"{', '.join(tags) or 'none'}; or {arch}.{RANDOM_TAG}: random weights, synthetic data)") from None


def _has_root(root) -> bool:
    if root is None:
        return False
    return root.available() if hasattr(root, "available") else True


def _configured_spec(name: str, mc: ModelConfig, root: Path) -> ModelSpec:
    where = f"[models.{name}]"
    weights = mc.weights or ("checkpoint" if mc.checkpoint else "")
    if weights and weights not in WEIGHTS:
        raise HarnessError(f"{where} weights must be pretrained, random or checkpoint, got {mc.weights!r}")
    if mc.data and mc.data not in DATA_SOURCES:
        raise HarnessError(f"{where} data must be one of {', '.join(DATA_SOURCES)}, got {mc.data!r}")
    ckpt = None
    if weights == "checkpoint":
        if not mc.checkpoint:
            raise HarnessError(f"{where} weights = \"checkpoint\" needs checkpoint = \"path/to/file.safetensors\"")
        ckpt = Path(mc.checkpoint).expanduser()
        ckpt = ckpt if ckpt.is_absolute() else root / ckpt
    if mc.card:
        spec = _over_card(mc, where, root, weights, ckpt)
    elif not mc.timm:
        raise HarnessError(f"{where} needs timm = \"arch.tag\" (or card = \"<reference checkpoint>\")")
    else:
        spec = ModelSpec(name, mc.timm, weights or "pretrained", ckpt, mc.num_classes, mc.data or "imagenet",
                         mc.data_path)
    if spec.weights == "random" and spec.data != "synthetic":
        raise HarnessError(f"{where} random weights give meaningless accuracy: use data = \"synthetic\"")
    return dataclasses.replace(spec, name=name)


def _over_card(mc: ModelConfig, where: str, root, weights: str, ckpt: Optional[Path]) -> ModelSpec:
    """A reference card with other weights or data: its architecture, classes and input stay, unless
    the weights are timm's pretrained ones (an ImageNet model of the card's architecture)."""
    card = _card_path(mc.card, root)
    if card is None:
        raise HarnessError(f"{where} card {mc.card!r} not found: looked for {root / 'models' / (mc.card + '.json')}")
    spec = _card_spec(card)
    if weights == "pretrained":
        spec = dataclasses.replace(spec, weights="pretrained", checkpoint=None, num_classes=None, card_transform=None)
    elif weights:
        spec = dataclasses.replace(spec, weights=weights, checkpoint=ckpt)
    if mc.num_classes is not None:
        spec = dataclasses.replace(spec, num_classes=mc.num_classes)
    if mc.data:
        spec = dataclasses.replace(spec, data=mc.data, data_path=mc.data_path)
    if weights or mc.data:
        spec = dataclasses.replace(spec, card_top1=None)  # the card's figure is for its own weights and data
    return spec


# ----------------------------------------------------------------- command-line overrides --

def parse_weights(text: str) -> tuple[str, str]:
    """``--weights``: ``random``, ``pretrained`` or a checkpoint file -> (weights, checkpoint path)."""
    if text in ("random", "pretrained"):
        return text, ""
    path = Path(text).expanduser()
    if not path.is_file():
        raise HarnessError(f"--weights takes random, pretrained or a checkpoint file; {text!r} is none of these "
                           f"(no file at {path.resolve()})")
    return "checkpoint", str(path.resolve())


def parse_data(text: str) -> tuple[str, str]:
    """``--data``: ``synthetic``, ``cifar10``, ``imagenet`` (the shared sample) or ``imagenet:PATH``."""
    source, _, path = text.partition(":")
    if source not in DATA_SOURCES or (path and source != "imagenet") or (text.endswith(":") and not path):
        raise HarnessError(f"--data takes synthetic, cifar10, imagenet or imagenet:PATH, got {text!r}")
    return source, str(Path(path).expanduser().resolve()) if path else ""


def override_models(names, configured: dict[str, ModelConfig], root, weights: Optional[str] = None,
                    data: Optional[str] = None) -> dict[str, ModelConfig]:
    """``[models.X]`` entries giving each of ``names`` the weights and data of ``--weights`` / ``--data``.

    A configured model keeps the rest of its entry, a reference card its architecture, classes and
    input; any other timm name gets an entry of its own. ``--weights random`` alone implies
    ``--data synthetic`` (random weights have no accuracy to measure).
    """
    w = parse_weights(weights) if weights else None
    d = parse_data(data) if data else None
    if w is not None and w[0] == "random" and d is None:
        d = ("synthetic", "")
    out = {}
    for name in names:
        resolve_model(name, configured, root)  # an unknown name fails here with its "did you mean"
        base = configured.get(name) or (ModelConfig(card=name) if _card_path(name, root) else _timm_entry(name))
        changes = {}
        if w is not None:
            changes.update(weights=w[0], checkpoint=w[1])
        if d is not None:
            changes.update(data=d[0], data_path=d[1])
        out[name] = dataclasses.replace(base, **changes)
    return out


def _timm_entry(name: str) -> ModelConfig:
    """The ``[models.X]`` entry a timm name stands for (``arch.random``: random weights, synthetic data)."""
    arch, _, tag = name.partition(".")
    return ModelConfig(timm=arch, weights="random", data="synthetic") if tag == RANDOM_TAG else ModelConfig(timm=name)


# ---------------------------------------------------------------------------------- weights --

def _read_state_dict(path: Path) -> dict:
    """A checkpoint file's state dict, by timm's ``load_state_dict`` (safetensors or torch, weights only)."""
    require_file(path, "checkpoint")
    try:
        from timm.models import load_state_dict

        return load_state_dict(str(path))
    except Exception as exc:
        raise HarnessError(f"checkpoint {path} is unreadable or corrupt: {type(exc).__name__}: {exc}".splitlines()[0]) from None


def _kwargs(spec: ModelSpec) -> dict:
    return {} if spec.num_classes is None else {"num_classes": spec.num_classes}


def _load_file_weights(spec: ModelSpec, path: Path, keep_head: bool):
    """A model of ``spec.arch`` with the weights of ``path``, through timm's ``load_pretrained``: the
    architecture's checkpoint filter, then a strict load.

    ``keep_head``: the file's classifier must fit the model (a checkpoint); otherwise timm's rule for
    pretrained weights applies (a classifier of another size is dropped and initialised afresh).
    """
    import timm

    overlay = {"state_dict": _read_state_dict(path)}
    if keep_head and spec.num_classes is not None:  # else the model has the config's classes already
        overlay["num_classes"] = spec.num_classes
    try:
        return timm.create_model(spec.arch, pretrained=True, pretrained_cfg_overlay=overlay, **_kwargs(spec))
    except Exception as exc:
        first = " ".join(str(exc).splitlines()[0:2])
        raise HarnessError(f"checkpoint {path} does not fit {spec.arch}: {type(exc).__name__}: {first}") from None


def _meta():
    import torch

    return torch.device("meta")


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache, as huggingface_hub finds it, read from the environment now."""
    env = os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def hf_offline() -> bool:
    """$HF_HUB_OFFLINE (or $TRANSFORMERS_OFFLINE) set, as huggingface_hub reads it."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def pretrained_file(spec: ModelSpec) -> tuple[Optional[Path], list[str]]:
    """The local file of timm's pretrained weights for ``spec.arch`` (``arch.tag``), and where it looked.

    The Hugging Face cache first (the ``hf_hub_id`` of the model's pretrained config; the safetensors
    file, else the torch one), then timm's old torch-hub cache (the config's ``url``). Nothing is
    downloaded.
    """
    import timm
    import torch
    from urllib.parse import urlparse

    with _meta():
        cfg = timm.create_model(spec.arch, pretrained=False).pretrained_cfg
    looked = []
    if cfg.get("hf_hub_id"):
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = cfg["hf_hub_id"].partition("@")
        wanted = cfg.get("hf_hub_filename") or "pytorch_model.bin"
        names = dict.fromkeys([wanted.replace("pytorch_model.bin", "model.safetensors"), wanted])
        hub = hf_hub_cache()
        for filename in names:
            found = try_to_load_from_cache(repo, filename, cache_dir=str(hub), revision=revision or None)
            if isinstance(found, str):
                return Path(found), looked
        looked.append(str(hub / f"models--{repo.replace('/', '--')}"))
    if cfg.get("url"):
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg["url"]).path)
        if path.is_file():
            return path, looked
        looked.append(str(path))
    return None, looked


def _pretrained(spec: ModelSpec):
    found, looked = pretrained_file(spec)
    if found is not None:
        log.info("pretrained weights of %s from %s", spec.arch, found)
        return _load_file_weights(spec, found, keep_head=False)
    if hf_offline():
        raise _no_weights(spec, looked, "HF_HUB_OFFLINE is set, so nothing was downloaded")
    unreachable = _unreachable(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    if unreachable:  # fail at once, not after huggingface_hub's minute of retries
        raise _no_weights(spec, looked, f"no download: {unreachable}")
    import timm

    try:
        return timm.create_model(spec.arch, pretrained=True, **_kwargs(spec))
    except Exception as exc:
        text = str(exc).splitlines()[0].rstrip(".") if str(exc) else ""
        raise _no_weights(spec, looked, f"the download failed: {type(exc).__name__}: {text}") from None


def _unreachable(url: str, timeout_s: float = 3.0) -> str:
    """Why ``url``'s host cannot be reached (a TCP connection within ``timeout_s``); "" when it can."""
    import socket
    from urllib.parse import urlparse

    parts = urlparse(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        return f"{host}:{port} cannot be reached ({exc})"
    return ""


def _no_weights(spec: ModelSpec, looked: list[str], why: str) -> HarnessError:
    where = " and ".join(looked) or "nowhere (timm names no pretrained weights for it)"
    return HarnessError(
        f"no pretrained weights for {spec.arch}: looked in {where}; {why}. Provide them one of two ways: a Hugging "
        f"Face cache that holds them (HF_HOME=DIR; fill it where there is a network with python -c \"import timm; "
        f"timm.create_model('{spec.arch}', pretrained=True)\"), or a local file: --weights PATH "
        f"(checkpoint = \"PATH\" in [models.{spec.name}])")


def build_model(spec: ModelSpec, state_dict: Optional[dict] = None):
    """A fresh timm model in eval mode with the spec's weights.

    ``state_dict`` is the model's own state dict from :func:`load_checkpoint`: a later cell copies
    it into a model built on the meta device, without reading a file or initialising again.
    """
    import timm
    import torch

    if state_dict is not None:
        model = _build_from_state_dict(spec, state_dict)
        if model is not None:
            return model
    if spec.weights == "random" or state_dict is not None:
        torch.manual_seed(0)  # the same random weights in every process and run
        try:
            model = timm.create_model(spec.arch, pretrained=False, **_kwargs(spec))
        except Exception as exc:
            raise HarnessError(f"model {spec.name} ({spec.arch}) could not be built: {type(exc).__name__}: {exc}".splitlines()[0]) from None
        if state_dict is not None:
            model.load_state_dict(state_dict)
        return model.eval()
    if spec.weights == "checkpoint":
        return _load_file_weights(spec, spec.checkpoint, keep_head=True).eval()
    return _pretrained(spec).eval()


def _build_from_state_dict(spec: ModelSpec, state_dict: dict):
    """The model again without timm's init (seconds for ViT-H): built on the meta device, then given
    ``state_dict``; None when the model has buffers the state dict lacks (non-persistent ones)."""
    import timm

    with _meta():
        model = timm.create_model(spec.arch, pretrained=False, **_kwargs(spec))
    if {name for name, _ in model.named_buffers()} - set(state_dict):
        return None
    model = model.to_empty(device="cpu")
    model.load_state_dict(state_dict)
    return model.eval()


def load_checkpoint(spec: ModelSpec) -> dict:
    """The spec's weights as the model's own state dict, read and checked once.

    A corrupt file, a file of another architecture or missing pretrained weights fail here, before
    any cell runs; later cells of the model copy the result instead of reading or initialising again.
    """
    return build_model(spec).state_dict()


def weights_file(spec: ModelSpec) -> Optional[Path]:
    """The file the spec's weights come from: its checkpoint, or timm's pretrained file found locally."""
    if spec.weights == "checkpoint":
        return spec.checkpoint
    if spec.weights == "pretrained":
        return pretrained_file(spec)[0]
    return None


def checkpoint_sha(spec: ModelSpec) -> Optional[str]:
    """First 16 hex digits of the weights file's sha256 (part of a cell's identity); None for random weights."""
    path = weights_file(spec)
    if path is None or not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()[:16]


def eval_transform(spec: ModelSpec, model) -> Transform:
    """The card's transform, else timm's ``resolve_data_config`` of the model's pretrained config
    (never hard-coded: AugReg ViTs use mean/std 0.5, DeiT ImageNet's, CLIP its own)."""
    if spec.card_transform is not None:
        return spec.card_transform
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    return Transform(int(cfg["input_size"][-1]), tuple(cfg["mean"]), tuple(cfg["std"]),
                     float(cfg.get("crop_pct") or 1.0), cfg.get("interpolation", "bicubic"),
                     cfg.get("crop_mode") or "center")
