"""Attention kernel settings, per-suite method options, speed-only reports and the GPU-run helpers, on CPU."""
from __future__ import annotations

import importlib.util
import io
import tarfile

import pytest
import timm
import torch

from harness.measurement import measure
from harness.cli import main
from harness.sweep.config import RunConfig, load_config
from harness.errors import HarnessError
from harness.paths import PROJECT_ROOT
from harness.registry import make_method
from harness.reporting.report import SPEED_TABLE, build_report, latex_table, model_rows
from harness.schedule import arch_spec
from harness.sweep.store import ResultStore

CONFIG = """
[run]
results_dir = "{results}"
device = "cpu"
throughput_batch_size = 2
throughput_repeats = 2
throughput_warmup = 0
throughput_latency = false
flops = false

[suites.s]
models = ["tiny", "small"]
methods = ["none", "tome"]
budgets = ["r=1"]

[suites.s.budgets_by_model]
small = ["r=2"]

[suites.s.method_options.tome]
r_list = [3, 3]

[methods.tome]
prop_attn = false

[models.tiny]
timm = "deit_tiny_patch16_224"
weights = "random"
data = "synthetic"

[models.small]
timm = "deit_small_patch16_224"
weights = "random"
data = "synthetic"
"""


def _module(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "benchmark.toml"
    path.write_text(CONFIG.format(results=tmp_path / "r"))
    return path


def test_eager_and_fused_tome_give_the_same_logits():
    # proportional attention's log-size mask must reach both of timm's attention paths alike
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    outs = []
    for attention in ("fused", "eager"):
        torch.manual_seed(1)  # the same weights for both
        model = timm.create_model("deit_tiny_patch16_224", num_classes=10).eval()
        measure.set_attention(model, attention)
        make_method("tome").patch(model, 13, arch_spec(model))
        assert all(b.attn.fused_attn == (attention == "fused") for b in model.blocks)
        with torch.no_grad():
            outs.append(model(x))
    assert model._seam_state.size is not None  # tokens merged and carried sizes
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)


def test_the_record_states_the_kernel_every_block_ran_or_refuses_the_cell():
    from harness.errors import UnsupportedModel
    from harness.sweep.execute import attention_ran

    model = timm.create_model("deit_tiny_patch16_224", depth=3, num_classes=10, img_size=64)
    measure.set_attention(model, "eager")
    assert attention_ran(model, "eager") == {"attention_kernel": "eager", "fused_attn": False}
    model.blocks[1].attn.fused_attn = True  # one block that would run another kernel than asked
    assert measure.attention_kernel(model) == "mixed"
    with pytest.raises(UnsupportedModel, match="asked for.*mixed"):
        attention_ran(model, "eager")
    measure.set_attention(model, "fused")
    assert attention_ran(model, "fused") == {"attention_kernel": "fused", "fused_attn": True}


@pytest.mark.slow
def test_eager_cells_are_their_own_cells_and_the_report_compares_kernels(config, tmp_path, capsys):
    base = ["run", "--config", str(config), "--suite", "s", "--models", "tiny", "--no-report"]
    assert main(base) == 0
    assert main(base + ["--attention", "eager"]) == 0
    assert main(base + ["--sdpa-backend", "math"]) == 0
    recs = ResultStore(tmp_path / "r").load_all()
    assert len(recs) == 6 and len({r["cell_id"] for r in recs}) == 6
    by = {(r["method"], r["attention"], r["sdpa_backend"]): r for r in recs}
    assert by[("tome", "eager", "auto")]["fused_attn"] is False and by[("tome", "fused", "auto")]["fused_attn"] is True
    assert by[("tome", "fused", "math")]["status"] == "ok"
    # the suite's tome options (r_list) over [methods.tome] (prop_attn = false): both apply
    tome = by[("tome", "fused", "auto")]
    assert tome["method_options"] == {"prop_attn": False, "r_list": [3, 3]}
    assert tome["tokens_per_block"][:3] == [194, 191, 191]

    capsys.readouterr()
    assert main(base) == 0  # resume: the fused cells are not run again
    assert "2 already done, 0 to run" in capsys.readouterr().out

    md = build_report(tmp_path / "r", tmp_path / "rep")
    assert "## tiny (eager attention, sdpa auto)" in md and "## tiny (fused attention, sdpa math)" in md
    assert "## Attention kernels" in md and "fused / eager" in md
    # synthetic data has no accuracy: speed tables, and no accuracy summary
    assert "latency ms (b=1)" in md and "Summary across models" not in md
    kernels = (tmp_path / "rep" / "kernels.csv").read_text().splitlines()
    assert len(kernels) == 3  # header, none and tome
    assert main(["plot", "--results", str(tmp_path / "r"), "--out", str(tmp_path / "rep")]) == 0
    figures = {p.name for p in (tmp_path / "rep" / "figures").iterdir()}
    assert "speedup_vs_ideal.png" in figures and "accuracy_vs_gmacs.png" not in figures


@pytest.mark.slow
def test_models_flag_narrows_budgets_by_model(config, tmp_path):
    assert main(["run", "--config", str(config), "--suite", "s", "--models", "small", "--methods", "tome",
                 "--no-report"]) == 0
    (rec,) = ResultStore(tmp_path / "r").load_all()
    assert rec["model"] == "small" and rec["budget"] == "r=2" and rec["knob_value"] == 2


@pytest.mark.parametrize("flags,needle", [
    (["--attention", "eager", "--sdpa-backend", "math"], "cannot go with attention = eager"),
    (["--repeats", "0"], "throughput_repeats >= 1"),
])
def test_bad_kernel_flags_exit_2(config, capsys, flags, needle):
    assert main(["run", "--config", str(config), "--suite", "s"] + flags) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err


def test_bad_kernel_settings_in_the_config_name_the_section(tmp_path):
    path = tmp_path / "b.toml"
    path.write_text('[run]\nattention = "flash"\n')
    with pytest.raises(HarnessError, match=r"\[run\].*unknown attention 'flash'; choices: fused, eager"):
        load_config(path)
    path.write_text('[suites.s]\nmodels = ["m"]\nmethod_options = 3\n')
    with pytest.raises(HarnessError, match="method_options"):
        load_config(path)


def test_timing_counts_defaults_by_device():
    assert measure.timing_counts(torch.device("cpu"), -1, -1) == (2, 5)
    assert measure.timing_counts(torch.device("cuda"), -1, -1) == (10, 30)
    assert measure.timing_counts(torch.device("cuda"), 0, 3) == (0, 3)
    assert RunConfig().throughput_repeats == -1


def test_random_weights_rebuilt_from_the_first_build_are_identical():
    from harness.sweep.config import ModelConfig
    from harness.loading.models import build_model, load_checkpoint, resolve_model

    spec = resolve_model("t", {"t": ModelConfig(timm="deit_tiny_patch16_224", weights="random", data="synthetic")}, None)
    sd = load_checkpoint(spec)
    again, fresh = build_model(spec, sd), build_model(spec)
    for (name, a), (_, b) in zip(again.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name
    assert all(not p.is_meta for p in again.parameters())


def test_speed_table_latex_has_one_column_per_header():
    rows = [{"budget": "baseline", "method": "none", "knob": "-", "gmacs": 1.0, "gmacs_measured": 1.0,
             "gmacs_overhead": 0.0, "img_per_s": 10.0, "iqr_pct": 1.0, "speedup": 1.0, "ideal_speedup": 1.0,
             "realised": 1.0, "latency_ms": 2.0, "peak_mem_mb": 5.0, "e2e_img_per_s": None, "best": False}]
    tex = latex_table(rows, "x", SPEED_TABLE)
    align = tex.split(r"\begin{tabular}{")[1].split("}")[0]
    body = [ln for ln in tex.splitlines() if ln.startswith("baseline")][0]
    assert len(align) == len(SPEED_TABLE) == body.count("&") + 1


def test_compare_runs_spread(tmp_path):
    compare = _module(PROJECT_ROOT / "scripts" / "compare_runs.py")
    assert compare.spread_pct([100.0, 102.0, 98.0]) == pytest.approx(4.0)
    for i, speed in enumerate([100.0, 104.0]):
        store = ResultStore(tmp_path / f"run{i}")
        store.ensure_writable()
        store.write({"cell_id": "c1", "status": "ok", "model": "m", "method": "tome", "budget": "r=13",
                     "device_name": "gpu", "img_per_s": speed, "latency_ms": 2.0})
    table = compare.compare([tmp_path / "run0", tmp_path / "run1"])
    assert "100.0, 104.0" in table and "3.9 %" in table  # 4 / median(100, 104) = 3.92 %


def _jpeg(value: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (value, value, value)).save(buf, "JPEG")
    return buf.getvalue()


def test_pack_data_keeps_the_test_split_and_the_first_train_images(tmp_path):
    from harness.loading.data import CIFAR10_CLASSES, load_cifar10
    from harness.loading.models import Transform

    pack = _module(PROJECT_ROOT / "scripts" / "pack_data.py")
    src = tmp_path / "full.tar.gz"
    with tarfile.open(src, "w:gz") as tar:
        for split, n in (("train", 5), ("test", 2)):
            for c, cls in enumerate(CIFAR10_CLASSES[:2]):
                for i in reversed(range(n)):  # archive order differs from name order
                    data = _jpeg(40 * c + 8 * i + (100 if split == "test" else 0))
                    info = tarfile.TarInfo(f"cifar10/{split}/{cls}/{i:04d}.jpg")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    dst = tmp_path / "root" / "datasets" / "cifar10-jpeg.tar.gz"
    assert pack.repack_cifar10(src, dst, 3) == {"test": 4, "train": 6}
    with tarfile.open(dst, "r:gz") as tar:
        train = sorted(m.name for m in tar if "/train/" in m.name)
    assert train == [f"cifar10/train/{cls}/{i:04d}.jpg" for cls in CIFAR10_CLASSES[:2] for i in range(3)]
    # the calibration set a limit within the packed images draws is the full archive's
    (tmp_path / "full" / "datasets").mkdir(parents=True)
    src.rename(tmp_path / "full" / "datasets" / "cifar10-jpeg.tar.gz")
    t = Transform(img_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear", crop_pct=None)
    full = load_cifar10(tmp_path / "full", "train", t, 4)
    packed = load_cifar10(tmp_path / "root", "train", t, 4)
    assert torch.equal(full.images, packed.images) and torch.equal(full.labels, packed.labels)


def test_git_sha_from_the_environment_where_the_tree_has_no_git(monkeypatch):
    monkeypatch.setenv("HARNESS_GIT_SHA", "abc123def456")
    assert measure.git_sha() == "abc123def456"
    monkeypatch.delenv("HARNESS_GIT_SHA")
    assert measure.git_sha() != "abc123def456"


@pytest.mark.slow
def test_profile_regions_account_for_the_forward(tmp_path, capsys):
    prof = _module(PROJECT_ROOT / "scripts" / "profile_regions.py")
    out = tmp_path / "p.md"
    assert prof.main(["--model", "deit_tiny_patch16_224", "--methods", "none,tome", "--budget", "r=13", "--batch", "1",
                      "--iters", "1", "--warmup", "0", "--device", "cpu", "--out", str(out)]) == 0
    text = out.read_text()
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:4]] for ln in text.splitlines() if ln.startswith("| ")}
    assert rows["reduce"][0].startswith("0.000") and not rows["reduce"][1].startswith("0.000")
    assert rows["analytic GMACs"] == ["1.254", "0.731"]
    for col in (0, 1):
        parts = [float(rows[r][col].split()[0]) for r in ("attention", "mlp", "reduce", "other")]
        assert sum(parts) == pytest.approx(float(rows["total"][col]), rel=1e-3) and min(parts) >= 0


def test_throttle_by_hand():
    from harness.progress import Throttle

    now = [0.0]
    due = Throttle(10.0, clock=lambda: now[0])
    seen = []
    for t in (1.0, 9.9, 10.0, 15.0, 20.5, 21.0):
        now[0] = t
        seen.append(due())
    assert seen == [False, False, True, False, True, False]
    assert due(last=True)


@pytest.mark.slow
def test_evaluation_progress_is_printed(monkeypatch, capsys, tmp_path, shared):
    from harness import progress

    class Always(progress.Throttle):
        def __init__(self, *args, **kwargs):  # any interval asked for: report every time
            super().__init__(0.0)

    monkeypatch.setattr(progress, "Throttle", Always)
    assert main(["run", "--models", "deit_tiny_cifar10", "--methods", "none", "--limit", "20", "--batch-size", "10",
                 "--device", "cpu", "--results", str(tmp_path / "r"), "--no-report", "--no-flops", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "evaluated 10/20 images (50 %)" in out and "evaluated 20/20 images (100 %)" in out


def test_cls_attention_layout_regions_by_hand():
    layout = _module(PROJECT_ROOT / "scripts" / "cls_attention_layout.py")
    ring, centre = layout.regions(14)
    assert int(ring.sum()) == 14 * 14 - 10 * 10 and int(centre.sum()) == 36
    assert not (ring & centre).any()
    grid = centre.view(14, 14)
    assert grid[4:10, 4:10].all() and not grid[3].any() and not grid[:, 10].any()
