"""The timing protocol: structure and invariants on CPU (no speed targets), the GPU path under a marker."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from harness.measurement import measure
from harness.loading.data import EvalSet
from harness.loading.models import Transform
from harness.registry import make_method
from harness.schedule import arch_spec

CPU = torch.device("cpu")


def tiny_vit():
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                             num_classes=10).eval()


class FitsBelow(nn.Module):
    """Raises CUDA out-of-memory for batches above ``limit``, as a GPU would."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.seen = limit, []

    def forward(self, x):
        self.seen.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (batch {x.shape[0]})")
        return x.mean((1, 2, 3))


def test_time_runs_times_repeats_after_warmup():
    calls = []
    times = measure.time_runs(lambda: calls.append(1), CPU, warmup=2, repeats=3)
    assert len(calls) == 5 and len(times) == 3 and all(t >= 0 for t in times)


def test_rate_stats_hand_case():
    s = measure.rate_stats([1.0, 2.0, 4.0], batch_size=4)  # rates 4, 2, 1 img/s
    assert (s["img_per_s"], s["img_per_s_min"], s["img_per_s_max"]) == (2.0, 1.0, 4.0)
    assert s["img_per_s_iqr"] == pytest.approx(1.5)
    assert measure.latency_stats([0.002, 0.001, 0.003])["latency_ms"] == 2.0


def test_oom_halves_the_batch_and_records_it():
    model = FitsBelow(3)
    out = measure.throughput(model, 8, 16, CPU, "fp32", warmup=1, repeats=2, latency=False)
    assert out["throughput_batch_size"] == 2 and out["throughput_batch_size_requested"] == 16
    assert out["oom_retries"] == 3
    assert model.seen[:4] == [16, 8, 4, 2]


def test_oom_below_the_smallest_batch_propagates():
    with pytest.raises(torch.cuda.OutOfMemoryError):
        measure.throughput(FitsBelow(3), 8, 16, CPU, "fp32", warmup=0, repeats=1, min_batch_size=4)


@pytest.mark.parametrize("method", ["none", "tome"])
def test_throughput_record_on_cpu(method):
    model = tiny_vit()
    arch = arch_spec(model)
    m = make_method(method)
    m.patch(model, 2 if m.knob else None, arch)
    out = measure.throughput(model, 32, 4, CPU, "fp32", warmup=1, repeats=3)
    assert out["img_per_s_min"] <= out["img_per_s"] <= out["img_per_s_max"]
    assert out["latency_ms_min"] <= out["latency_ms"] <= out["latency_ms_max"]
    assert out["img_per_s_iqr"] >= 0
    assert out["throughput_batch_size"] == 4 and out["oom_retries"] == 0
    assert out["timing_clock"] == "cpu_perf_counter" and out["peak_mem_mb"] is None
    assert out["compiled"] is False and out["dtype"] == "fp32"


class FakeDeviceMemory(measure.MemoryCounter):
    """A device's allocator counter, by hand: ``resident`` bytes held by other models from the start."""

    def __init__(self, resident: int):
        self.now = self.top = resident

    def reset_peak(self):
        self.top = self.now

    def allocated(self):
        return self.now

    def peak(self):
        return self.top

    def hold(self, n: int):  # a forward's activations: allocated, then freed
        self.now += n
        self.top = max(self.top, self.now)
        self.now -= n


class Activations(nn.Module):
    """A model with ``weights`` parameters whose forward holds ``activation`` bytes on ``memory``."""

    def __init__(self, memory: FakeDeviceMemory, weights: int, activation: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(weights))
        self.memory, self.activation = memory, activation

    def forward(self, x):
        self.memory.hold(self.activation)
        return x.mean((1, 2, 3)) + self.w[0]


@pytest.mark.parametrize("others_gib", [0, 3, 11])
@pytest.mark.parametrize("with_baseline", [False, True])
def test_peak_memory_is_the_cells_model_alone(others_gib, with_baseline):
    mib = 2**20
    model_weights = 1024 * 1024  # 4 MiB of fp32 parameters
    memory = FakeDeviceMemory(0)
    model = Activations(memory, model_weights, activation=50 * mib)
    baseline = Activations(memory, 2 * model_weights, activation=300 * mib) if with_baseline else None
    # every other model resident on the device (other models' baselines), plus this model and its baseline
    memory.now = memory.top = others_gib * 2**30 + measure.model_bytes(model) + (
        measure.model_bytes(baseline) if baseline is not None else 0)
    out = measure.throughput(model, 8, 2, CPU, "fp32", warmup=1, repeats=3, latency=False, baseline=baseline,
                             memory=memory)
    assert out["peak_mem_mb"] == pytest.approx(4 + 50, abs=0.1)  # its weights and activations, nothing resident


def test_model_bytes_counts_shared_tensors_once():
    lin = nn.Linear(4, 4)
    shared = nn.Sequential(lin, lin)
    assert measure.model_bytes(shared) == measure.model_bytes(lin) == (16 + 4) * 4


def test_bf16_autocast_runs_on_cpu():
    out = measure.throughput(tiny_vit(), 32, 2, CPU, "bf16", warmup=0, repeats=1, latency=False)
    assert out["dtype"] == "bf16" and out["img_per_s"] > 0


def test_compile_is_recorded():
    model = tiny_vit()
    make_method("tome").patch(model, 2, arch_spec(model))
    out = measure.throughput(model, 32, 2, CPU, "fp32", warmup=1, repeats=1, latency=False, compile=True,
                             compile_backend="eager")
    assert out["compiled"] is True and out["compile_error"] is None
    assert isinstance(out["graph_breaks"], int) and out["graph_breaks"] >= 0


def test_compile_failure_is_data_and_timing_goes_on():
    def broken_backend(gm, example_inputs):
        raise RuntimeError("backend exploded")

    out = measure.throughput(tiny_vit(), 32, 2, CPU, "fp32", warmup=0, repeats=1, latency=False, compile=True,
                             compile_backend=broken_backend)
    assert out["compiled"] is False and "backend exploded" in out["compile_error"]
    assert out["img_per_s"] > 0


def test_end_to_end_from_jpeg_bytes():
    t = Transform(32, (0.5,) * 3, (0.5,) * 3)
    synthetic = EvalSet("synthetic", None, None, t, num_synthetic=4)
    jpegs = measure.sample_jpegs(synthetic, 3, src_size=40)
    assert len(jpegs) == 3 and all(j[:2] == b"\xff\xd8" for j in jpegs)
    assert measure.decode_batch(jpegs).shape == (3, 3, 40, 40)
    out = measure.end_to_end(tiny_vit(), jpegs, t, 5, CPU, "fp32", warmup=1, repeats=2, decode_threads=2)
    assert out["e2e_batch_size"] == 5 and out["e2e_decode_threads"] == 2
    assert out["e2e_img_per_s_min"] <= out["e2e_img_per_s"] <= out["e2e_img_per_s_max"]


def test_jpegs_come_from_uint8_eval_images():
    images = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    ev = EvalSet("cifar10-test", images, torch.tensor([0, 1]), Transform(32, (0.5,) * 3, (0.5,) * 3))
    assert measure.decode_batch(measure.sample_jpegs(ev, 2)).shape == (2, 3, 32, 32)


def test_environment_labels_cpu():
    env = measure.environment(CPU)
    assert env["device"] == "cpu" and env["device_name"].startswith("cpu (")
    assert env["cuda"] is None and env["driver"] is None
    assert {"torch", "timm", "timm_fused_attn", "git_sha"} <= set(env)


@pytest.mark.gpu
def test_gpu_protocol():
    dev = torch.device("cuda")
    env = measure.environment(dev)
    assert env["device"] == "cuda" and not env["device_name"].startswith("cpu") and env["cuda"]
    out = measure.throughput(tiny_vit().to(dev), 32, 64, dev, "bf16", warmup=2, repeats=5)
    assert out["timing_clock"] == "cuda_event" and out["peak_mem_mb"] > 0
    assert out["img_per_s_min"] <= out["img_per_s"] <= out["img_per_s_max"]


def test_only_the_current_models_baseline_stays_resident(monkeypatch):
    import gc
    import weakref

    from harness.loading import inputs as inputs_mod
    from harness.sweep.cell import CellSettings
    from harness.loading.models import ModelSpec
    from harness.paths import DataRoot

    built = []
    monkeypatch.setattr(inputs_mod, "build_unpatched", lambda spec, sd, settings: built.append(spec.name) or nn.Linear(2, 2))
    inputs = inputs_mod.Inputs(DataRoot(), limit=0)
    monkeypatch.setattr(inputs, "state_dict", lambda spec: None)
    a, b = (ModelSpec(n, "deit_tiny_patch16_224", "random", None, 10, "synthetic") for n in ("a", "b"))
    settings = CellSettings(CPU)
    first = inputs.baseline(a, settings)
    assert inputs.baseline(a, settings) is first  # the same model's cells share one
    gone = weakref.ref(first)
    del first
    inputs.baseline(b, settings)
    gc.collect()
    assert gone() is None, "model a's baseline is still held while model b's cells run"
    assert built == ["a", "b"]
