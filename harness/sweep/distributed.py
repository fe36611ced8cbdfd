"""Data-parallel evaluation of one cell over several processes (``torchrun``), as DeiT's --dist-eval.

Each rank evaluates a disjoint stride of the eval set (no padding duplicates, unlike a
DistributedSampler), counts are summed, and only rank 0 times throughput and writes records.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    """This process's place in the group; world 1 means a plain single-process run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init_from_env(device: torch.device) -> Dist:
    """Join the process group torchrun describes (WORLD_SIZE > 1): gloo on CPU, NCCL on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as td

    if not td.is_initialized():
        td.init_process_group("nccl" if device.type == "cuda" else "gloo")
    d = Dist(td.get_rank(), td.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    log.info("rank %d of %d", d.rank, d.world)
    return d


def all_sum(values: list[float], d: Dist) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (float64 on CPU, exact for counts)."""
    if not d.active:
        return values
    import torch.distributed as td

    t = torch.tensor(values, dtype=torch.float64)
    td.all_reduce(t)
    return t.tolist()


def broadcast(obj: Any, d: Dist) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not d.active:
        return obj
    import torch.distributed as td

    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]


def first_error(err: Optional[BaseException], d: Dist) -> Optional[BaseException]:
    """The lowest rank's error, on every rank (None when no rank failed): all ranks fail a step together.

    ``err`` must pickle (it travels to the other ranks).
    """
    if not d.active:
        return err
    import torch.distributed as td

    errors: list = [None] * d.world
    td.all_gather_object(errors, err)
    return next((e for e in errors if e is not None), None)


def barrier(d: Dist) -> None:
    if d.active:
        import torch.distributed as td

        td.barrier()


def finish(d: Dist) -> None:
    """Leave the process group cleanly at the end of a sweep."""
    if d.active:
        import torch.distributed as td

        td.barrier()
        td.destroy_process_group()


def combine_accuracy(shard: dict, d: Dist) -> dict:
    """Whole-set top-1/top-5 from each rank's shard result (fractions over its own images)."""
    n = shard["n_images"]
    c1, c5, total = all_sum([round(shard["top1"] * n), round(shard["top5"] * n), n], d)
    return {**shard, "top1": c1 / total, "top5": c5 / total, "n_images": int(total), "eval_ranks": d.world}
