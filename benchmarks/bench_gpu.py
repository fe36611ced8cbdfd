"""GPU speed of DeiT-S patched by each method at budget 0.7; skipped without CUDA.

asv counts a larger value as worse, so throughput is tracked as its inverse, milliseconds per
image: a drop in images/s shows as an increase, i.e. a regression in ``asv compare``. Timing is the
harness's own protocol (:func:`harness.measurement.measure.throughput`: warm-up, CUDA events, median).
"""
from __future__ import annotations

import torch

from harness.measurement.measure import throughput

from .common import METHODS, patched

BATCH = 256
DTYPE = "bf16"  # autocast, what the harness uses on GPU by default
WARMUP, REPEATS = 5, 20


class SpeedGPU:
    """Forward time per image at batch 256 (throughput) and per batch of one (latency)."""

    params = [METHODS]
    param_names = ["method"]
    timeout = 300

    def setup(self, method):
        if not torch.cuda.is_available():
            raise NotImplementedError("no CUDA device")  # asv marks the benchmark skipped
        self.device = torch.device("cuda")
        model, _ = patched(method)
        self.model = model.to(self.device)

    def _ms_per_img(self, batch: int) -> float:
        stats = throughput(self.model, 224, batch, self.device, DTYPE, WARMUP, REPEATS, latency=False)
        return 1000.0 / stats["img_per_s"]

    def track_ms_per_img(self, method):
        """1000 / (images/s) at batch 256: the throughput, inverted so that lower is better."""
        return self._ms_per_img(BATCH)

    track_ms_per_img.unit = "ms/img"

    def track_latency_ms(self, method):
        """Median time of one forward pass of a single image."""
        return self._ms_per_img(1)

    track_latency_ms.unit = "ms"
