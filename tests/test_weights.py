"""Weights without a network: timm's pretrained weights from a local Hugging Face cache, local files
for any timm architecture through timm's own loading, and one clear line when there are none."""
import hashlib
import json

import pytest
import torch

from harness.cli import main
from harness.sweep.config import ModelConfig
from harness.errors import HarnessError
from harness.loading.models import build_model, checkpoint_sha, load_checkpoint, resolve_model
from harness.sweep.store import ResultStore

ARCH = "deit_tiny_patch16_224"
HUB_ID = "timm--deit_tiny_patch16_224.fb_in1k"  # the hf_hub_id of timm's default deit_tiny tag


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No real caches: an empty HF home, offline, crops cached under the test's folder."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-empty"))
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)


def _random_state_dict(arch=ARCH, seed=1, **kwargs) -> dict:
    import timm

    torch.manual_seed(seed)
    return timm.create_model(arch, **kwargs).state_dict()


def _fake_hf_cache(home, sd) -> "Path":
    """A Hugging Face cache as hf_hub_download leaves it: refs/main -> snapshots/<commit>/model.safetensors."""
    from safetensors.torch import save_file

    repo = home / "hub" / f"models--{HUB_ID}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, snap / "model.safetensors")
    return snap / "model.safetensors"


def _same_weights(model, sd) -> bool:
    own = model.state_dict()
    return set(own) == set(sd) and all(torch.equal(own[k], sd[k]) for k in sd)


@pytest.mark.slow
def test_pretrained_weights_come_from_the_local_hf_cache(tmp_path, monkeypatch):
    sd = _random_state_dict()
    file = _fake_hf_cache(tmp_path / "hf", sd)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    spec = resolve_model(ARCH, {}, None)
    assert spec.weights == "pretrained"
    assert _same_weights(build_model(spec), sd)
    assert checkpoint_sha(spec) == hashlib.sha256(file.read_bytes()).hexdigest()[:16]
    # later cells copy the loaded weights into a model built on the meta device
    assert _same_weights(build_model(spec, load_checkpoint(spec)), sd)


def test_hf_hub_cache_variable_wins_over_hf_home(tmp_path, monkeypatch):
    sd = _random_state_dict()
    _fake_hf_cache(tmp_path / "elsewhere", sd)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere" / "hub"))
    assert _same_weights(build_model(resolve_model(ARCH, {}, None)), sd)


def test_missing_pretrained_weights_is_one_line_naming_where_and_how(tmp_path):
    spec = resolve_model(ARCH, {}, None)
    with pytest.raises(HarnessError) as err:
        build_model(spec)
    msg = str(err.value)
    assert "\n" not in msg
    assert str(tmp_path / "hf-empty" / "hub" / f"models--{HUB_ID}") in msg  # where it looked
    assert "HF_HUB_OFFLINE" in msg and "HF_HOME" in msg and "--weights PATH" in msg  # why, and the two ways


def test_missing_weights_through_the_cli_exit_2(capsys, tmp_path):
    code = main(["run", "--models", ARCH, "--methods", "none", "--data", "synthetic", "--results", str(tmp_path / "r")])
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: no pretrained weights for deit_tiny")


@pytest.mark.parametrize("fmt", ["safetensors", "pth-wrapped"])
def test_checkpoint_file_for_any_timm_arch(tmp_path, fmt):
    sd = _random_state_dict("vit_tiny_patch16_224", seed=2)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file(sd, path)
    else:  # a training checkpoint: {"model": ...} with DDP's "module." prefixes, read by timm's load_state_dict
        path = tmp_path / "w.pth"
        torch.save({"model": {"module." + k: v for k, v in sd.items()}, "epoch": 3}, path)
    cfg = {"m": ModelConfig(timm="vit_tiny_patch16_224", checkpoint=str(path), data="synthetic")}
    spec = resolve_model("m", cfg, None)
    assert spec.weights == "checkpoint"
    assert _same_weights(build_model(spec), sd)


def test_checkpoint_goes_through_timms_filter(tmp_path):
    """A checkpoint at another resolution: timm's vit filter resamples its position embedding."""
    from safetensors.torch import save_file

    sd = _random_state_dict("vit_tiny_patch16_224", seed=3, img_size=160)  # 10x10 patches
    save_file(sd, tmp_path / "w.safetensors")
    spec = resolve_model("m", {"m": ModelConfig(timm="vit_tiny_patch16_224", checkpoint=str(tmp_path / "w.safetensors"),
                                                data="synthetic")}, None)
    model = build_model(spec)
    assert model.pos_embed.shape == (1, 197, 192)
    torch.testing.assert_close(model.pos_embed[:, 0], sd["pos_embed"][:, 0])  # the class token's is kept


def test_checkpoint_head_of_another_size_does_not_fit(tmp_path):
    from safetensors.torch import save_file

    save_file(_random_state_dict(), tmp_path / "w.safetensors")  # 1000 classes
    spec = resolve_model("m", {"m": ModelConfig(timm=ARCH, checkpoint=str(tmp_path / "w.safetensors"), num_classes=10,
                                                data="synthetic")}, None)
    with pytest.raises(HarnessError, match="does not fit deit_tiny_patch16_224"):
        build_model(spec)


@pytest.mark.slow
def test_weights_random_data_synthetic_for_a_vit_not_in_the_config(capsys, tmp_path):
    """Any timm ViT from the command line, without editing benchmark.toml (AugReg: mean/std 0.5)."""
    results = tmp_path / "r"
    assert main(["run", "--models", "vit_tiny_patch16_224", "--weights", "random", "--data", "synthetic",
                 "--methods", "none", "--limit", "2", "--device", "cpu", "--repeats", "1", "--throughput-batch-size", "2",
                 "--no-flops", "--results", str(results), "--no-report"]) == 0
    (rec,) = ResultStore(results).load_all()
    assert rec["status"] == "ok" and rec["arch"] == "vit_tiny_patch16_224"
    assert rec["weights"] == "random" and rec["data"] == "synthetic" and rec.get("top1") is None  # no labels


def _jpeg_folder(root, n=4):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for i in range(n):
        d = root / ("n01440764", "n01443537")[i % 2]
        d.mkdir(parents=True, exist_ok=True)
        x = torch.randint(0, 256, (60 + 8 * i, 80, 3), dtype=torch.uint8, generator=g).numpy()
        Image.fromarray(x).save(d / f"img_{i}.JPEG", quality=90)
    return root


@pytest.mark.slow
def test_pretrained_from_cache_on_an_imagenet_folder(capsys, tmp_path, monkeypatch):
    """The papers' setting in miniature: --data imagenet:PATH, pretrained weights from a local cache."""
    file = _fake_hf_cache(tmp_path / "hf", _random_state_dict())
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    val = _jpeg_folder(tmp_path / "val")
    results = tmp_path / "r"
    argv = ["run", "--models", ARCH, "--data", f"imagenet:{val}", "--methods", "none", "--device", "cpu", "--repeats", "1",
            "--throughput-batch-size", "2", "--no-flops", "--results", str(results), "--no-report"]
    assert main(argv) == 0
    (rec,) = ResultStore(results).load_all()
    assert rec["status"] == "ok" and rec["n_images"] == 4 and rec["weights"] == "pretrained"
    assert rec["data"] == "imagenet" and rec["data_path"] == str(val)
    assert rec["checkpoint_sha"] == hashlib.sha256(file.read_bytes()).hexdigest()[:16]


def test_weights_path_on_a_reference_card_keeps_its_input(tmp_path, shared):
    from harness.paths import DataRoot
    from harness.loading.models import override_models

    entries = override_models(["deit_tiny_cifar10"], {}, DataRoot(str(shared)), str(shared / "models/deit_tiny_cifar10.safetensors"),
                              "synthetic")
    spec = resolve_model("deit_tiny_cifar10", entries, DataRoot(str(shared)))
    assert spec.num_classes == 10 and spec.card_transform is not None and spec.card_transform.crop_pct is None
    assert spec.weights == "checkpoint" and spec.data == "synthetic"
    card = json.loads((shared / "models/deit_tiny_cifar10.json").read_text())
    assert spec.arch == card["arch"]


def test_an_unreachable_hub_is_named_at_once():
    """Without HF_HUB_OFFLINE, an unreachable hub ends the search at once, not after a minute of retries."""
    import time

    from harness.loading.models import _unreachable

    t0 = time.monotonic()
    why = _unreachable("http://127.0.0.1:9", timeout_s=1)
    assert "127.0.0.1:9 cannot be reached" in why and time.monotonic() - t0 < 5
