"""Where the class token looks: its attention on the image's border ring and centre, per block.

    python scripts/cls_attention_layout.py --model deit_tiny_cifar10 --images 300 --blocks 4,7,10 --keep 0.7

On the unpatched model and the first ``--images`` test images (class-balanced), at each 1-based block
of ``--blocks``: the share of the class token's attention (averaged over heads, as EViT scores
tokens) on the outer two-patch ring and on the central 6 x 6 patches, against their share of the
area; and which of those patches a top-``keep`` selection by that attention keeps. Used to explain
why EViT / Top-K fall below random pruning on the CIFAR-10 reference models (README).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from harness.loading.data import load_eval_set  # noqa: E402
from harness.sweep.cell import build_unpatched  # noqa: E402
from harness.loading.models import eval_transform, load_checkpoint, resolve_model  # noqa: E402
from harness.paths import data_root  # noqa: E402
from harness.seam import install  # noqa: E402


def regions(grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks over ``grid`` x ``grid`` patches: the outer two-patch ring, the central 6 x 6."""
    yy, xx = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    ring = (yy < 2) | (yy >= grid - 2) | (xx < 2) | (xx >= grid - 2)
    lo = (grid - 6) // 2
    centre = (yy >= lo) & (yy < lo + 6) & (xx >= lo) & (xx < lo + 6)
    return ring.flatten(), centre.flatten()


@torch.inference_mode()
def class_attention(model, evalset, blocks: list[int], batch: int = 50) -> dict[int, torch.Tensor]:
    """Per 0-based block: (images, patches) class-token attention over the patch tokens, rows summing to 1."""
    rows: dict[int, list] = {b: [] for b in blocks}

    def probe(b):
        def reducer(x, ctx):
            rows[b].append(ctx.cls_attn()[:, ctx.num_prefix:])
            return x

        return reducer

    install(model, {b: probe(b) for b in blocks})
    for s in range(0, len(evalset), batch):
        model(evalset.batch(s, min(s + batch, len(evalset)), torch.device("cpu"))[0])
    out = {}
    for b, parts in rows.items():
        a = torch.cat(parts)
        out[b] = a / a.sum(1, keepdim=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deit_tiny_cifar10")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--blocks", default="4,7,10", help="1-based blocks")
    p.add_argument("--keep", type=float, default=0.7, help="fraction of patches a top-k selection keeps")
    args = p.parse_args(argv)

    root = data_root()
    spec = resolve_model(args.model, {}, root)
    model = build_unpatched(spec, load_checkpoint(spec))
    evalset = load_eval_set(spec, eval_transform(spec, model), root, args.images)
    blocks = [int(b) - 1 for b in args.blocks.split(",")]
    attn = class_attention(model, evalset, blocks)
    grid = int(round(model.patch_embed.num_patches ** 0.5))
    ring, centre = regions(grid)
    print(f"{args.model}, {len(evalset)} test images; ring: outer two patches ({ring.float().mean():.0%} of the "
          f"area), centre: central 6x6 ({centre.float().mean():.0%})")
    print("| block | attention on ring | on centre | top-k keeps of ring | of centre |")
    print("|---|---|---|---|---|")
    for b, a in attn.items():
        k = int(args.keep * a.shape[1])
        kept = torch.zeros_like(a, dtype=torch.bool).scatter_(1, a.topk(k, dim=1).indices, True)
        print(f"| {b + 1} | {a[:, ring].sum(1).mean():.1%} | {a[:, centre].sum(1).mean():.1%} | "
              f"{kept[:, ring].float().mean():.1%} | {kept[:, centre].float().mean():.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
