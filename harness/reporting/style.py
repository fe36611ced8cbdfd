"""One visual identity per method, the same in every figure and report: colour, marker and line style.

Colours come from palettes safe for colour-blind readers: Okabe and Ito's first, then Paul Tol's
muted and bright sets for more methods. Each method also has its own marker and line pattern, so a
figure printed in grey still tells the methods apart. Rules:

- a built-in method (and the ones being added: ``reprshift``, ``gtp``, ``dynamicvit``) has a fixed
  entry in :data:`KNOWN`;
- any other name (an outside plugin) hashes (sha1, stable across processes) into the colours,
  markers and patterns no built-in uses;
- ``follower@leader`` (``random@tome``: the follower at the leader's token schedule, the leader's
  paired control) keeps the leader's colour and marker, hollow, on a dashed line: never a new colour;
- a variant (``random[seed=1]``: one of a method's stored configurations) keeps its method's marker,
  in a colour of its own and dotted;
- ``none`` is a black star; a reference method (``resolution``) is black.

:func:`model_title` turns an environment into a figure title ("DeiT-S · CIFAR-10 · 200 images").
"""
from __future__ import annotations

import hashlib
import re

# Okabe & Ito (2008), less black (the baseline's) and yellow (too light for a line on white)
OKABE_ITO = {"blue": "#0072B2", "orange": "#E69F00", "green": "#009E73", "vermillion": "#D55E00",
             "purple": "#CC79A7", "sky": "#56B4E9"}
# Paul Tol's muted and bright qualitative sets, for the methods past Okabe-Ito's six
TOL = {"indigo": "#332288", "wine": "#882255", "olive": "#999933", "teal": "#44AA99", "rose": "#CC6677",
       "sand": "#DDCC77", "cyan": "#88CCEE", "tolpurple": "#AA4499", "tolgreen": "#117733", "tolblue": "#4477AA"}
GREY = "#7f7f7f"
BLACK = "#000000"
# method line patterns: each readable in grey; "--" (dashed) is kept for paired controls, ":" for variants
SOLID, DASHDOT, DASHDOTDOT, LONGDASH = "-", "-.", (0, (5, 1.2, 1, 1.2, 1, 1.2)), (0, (7, 1.5))
CONTROL_LINE, VARIANT_LINE = "--", ":"
# name -> (colour, marker, line pattern)
KNOWN = {
    "none": (BLACK, "*", SOLID),
    "resolution": (BLACK, "P", CONTROL_LINE),  # a reference line: black; dashed like a control, never coloured
    "random": (GREY, "x", SOLID),
    "tome": (OKABE_ITO["blue"], "o", SOLID),
    "evit": (OKABE_ITO["orange"], "s", SOLID),
    "topk": (OKABE_ITO["green"], "^", DASHDOT),
    "diffrate": (OKABE_ITO["vermillion"], "D", SOLID),
    "mctf": (OKABE_ITO["purple"], "h", DASHDOT),
    "tofu": (OKABE_ITO["sky"], "v", DASHDOTDOT),
    "pitome": (TOL["wine"], "<", SOLID),
    "atc": (TOL["olive"], ">", DASHDOT),
    "ppt": (TOL["indigo"], "p", SOLID),
    "dct": (TOL["teal"], "X", DASHDOTDOT),
    "zerotprune": (TOL["rose"], "d", LONGDASH),
    "reprshift": (TOL["tolgreen"], "H", DASHDOTDOT),
    "gtp": (TOL["tolpurple"], "8", LONGDASH),
    "dynamicvit": (TOL["sand"], "$\u2295$", DASHDOT),
}
# what an unknown name hashes into: colours, markers and patterns no built-in uses
# (Tol's vibrant set adds the four its muted and bright sets lack)
SPARE_COLORS = tuple(c for c in (*TOL.values(), "#EE3377", "#CC3311", "#33BBEE", "#009988", "#BBBBBB")
                     if c not in {v[0] for v in KNOWN.values()})
SPARE_MARKERS = ("1", "2", "3", "4", "+", "|", "_", "$\u25c7$")
SPARE_LINES = (SOLID, DASHDOT, DASHDOTDOT)
HOLLOW = "white"


def _sha(name: str) -> int:
    # sha1, not hash(): Python salts str hashes per process, and figures must agree across runs
    return int(hashlib.sha1(name.encode()).hexdigest(), 16)


def base_method(label: str) -> str:
    """The method a label names: ``random[seed=1]`` -> ``random``."""
    return str(label).split("[", 1)[0]


def method_style(name: str, reference: bool = False) -> dict:
    """Colour, marker, marker face and line pattern of ``name`` (see the module docstring).

    Args:
        name: a method label (``tome``, ``random@tome``, ``random[seed=1]``, any plugin's name).
        reference: the method is a reference line (``Method.baseline``): drawn black.
    """
    if base_method(name) != name:
        h = _sha(name)
        return {**method_style(base_method(name), reference), "color": SPARE_COLORS[h % len(SPARE_COLORS)],
                "linestyle": VARIANT_LINE, "markerfacecolor": HOLLOW}
    follower, sep, leader = name.partition("@")
    if sep:
        lead = method_style(leader)
        return {"color": lead["color"], "marker": lead["marker"], "linestyle": CONTROL_LINE, "markerfacecolor": HOLLOW}
    if name in KNOWN:
        color, marker, line = KNOWN[name]
    else:
        h = _sha(name)
        color = SPARE_COLORS[h % len(SPARE_COLORS)]
        marker = SPARE_MARKERS[(h // 7) % len(SPARE_MARKERS)]
        line = SPARE_LINES[(h // 97) % len(SPARE_LINES)]
    if reference:
        color = BLACK
    return {"color": color, "marker": marker, "linestyle": line, "markerfacecolor": color}


def is_control(name: str) -> bool:
    """Whether a label is a paired control (``random@tome``: the follower at the leader's schedule)."""
    return "@" in base_method(name)


def known_order(name: str) -> int:
    """Position of a method in the fixed table (unknown names after every built-in)."""
    keys = list(KNOWN)
    return keys.index(name) if name in keys else len(keys)


# --- titles ----------------------------------------------------------------------------------------

ARCH_NAMES = {"deit3": "DeiT III", "deit": "DeiT", "vit": "ViT", "eva02": "EVA-02", "eva": "EVA", "beit": "BEiT",
              "beitv2": "BEiT v2", "flexivit": "FlexiViT"}
SIZES = {"tiny": "T", "small": "S", "base": "B", "large": "L", "huge": "H", "giant": "g"}
DATA_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "imagenet": "ImageNet", "imagenet1k": "ImageNet-1k",
              "synthetic": "synthetic images"}


def arch_title(arch: str) -> str:
    """``deit_small_patch16_224`` -> ``DeiT-S``; a name it cannot read comes back as it is."""
    m = re.match(r"([a-z]+\d*)_([a-z]+)_", str(arch) + "_")
    if not m or m.group(1) not in ARCH_NAMES or m.group(2) not in SIZES:
        return str(arch)
    return f"{ARCH_NAMES[m.group(1)]}-{SIZES[m.group(2)]}"


def model_title(arch: str, data: str, n_images, extra: str = "") -> str:
    """A figure title from a model's card fields: ``DeiT-S · CIFAR-10 · 200 images`` (+ ``extra``)."""
    parts = [arch_title(arch), DATA_NAMES.get(str(data), str(data))]
    if n_images:
        parts.append(f"{int(n_images):,} images")
    return " · ".join(parts) + (f" ({extra})" if extra else "")
