"""The crop cache: timm's exact crops, decoded once, streamed in batches, never trusted when torn."""
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.loading import datacache
from harness.loading.data import EvalSet, load_cifar10, load_imagenet_folder, stretch_and_normalize
from harness.loading.models import Transform
from harness.paths import PROJECT_ROOT

CPU = torch.device("cpu")
DEIT = Transform(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0.9, "bicubic", "center")
SMALL = Transform(32, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), 0.875, "bicubic", "center")


@pytest.fixture(autouse=True)
def _cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def progress_lines():
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    log = logging.getLogger("harness.progress")
    log.addHandler(handler)
    level = log.level
    log.setLevel(logging.INFO)
    yield lines
    log.removeHandler(handler)
    log.setLevel(level)


def _folder(root: Path, n: int = 12, gray: int = -1) -> Path:
    """An ImageNet-layout folder of ``n`` JPEGs of varying sizes over three synsets."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / ("n01440764", "n01443537", "n01484850")[i % 3]
        d.mkdir(parents=True, exist_ok=True)
        h, w = 40 + 4 * i, 56 - 2 * i
        x = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        img = Image.fromarray(x).convert("L") if i == gray else Image.fromarray(x)
        img.save(d / f"img_{i:03d}.JPEG", quality=90)
    return root


def _cache_folders(root: Path) -> list[Path]:
    return sorted(p for p in (root / "cache" / "data").iterdir() if p.is_dir() and not p.name.startswith("."))


# ----------------------------------------------------------------- timm's transform, exactly --

@pytest.mark.slow
def test_crops_equal_timms_eval_pipeline_on_the_imagenet_sample(shared):
    """uint8 crops == timm's create_transform output before Normalize, on 100 real images (one gray);
    the streamed batch == timm's normalised output, bit for bit."""
    from PIL import Image
    from timm.data import create_transform

    folder = shared / "datasets/imagenet-sample/val"
    s = load_imagenet_folder(folder, DEIT)
    timm_tf = create_transform(input_size=(3, 224, 224), interpolation="bicubic", mean=DEIT.mean, std=DEIT.std,
                               crop_pct=0.9, crop_mode="center")
    before_normalize = type(timm_tf)(timm_tf.transforms[:-1])
    files = sorted(folder.glob("*/*"))
    x, y = s.batch(0, len(s), CPU)
    assert len(files) == len(s) == 100 and y.tolist() == list(range(0, 1000, 10))
    for i, f in enumerate(files):
        img = Image.open(f).convert("RGB")
        ref = before_normalize(img)  # float in [0, 1], what ToTensor gives
        assert torch.equal(s.images[i].float() / 255, ref), f
        assert torch.equal(x[i], timm_tf(img)), f


def test_card_transform_keeps_cifar_at_source_size_and_stretches_on_the_device(shared):
    """The reference cards: 32x32 cached as is, 32 -> 224 bilinear stretch and normalise per batch."""
    card = Transform(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    s = load_cifar10(shared, "test", card, limit=20)
    assert s.images.shape == (20, 3, 32, 32) and s.images.dtype == torch.uint8
    x, _ = s.batch(0, 20, CPU)
    assert torch.equal(x, stretch_and_normalize(s.images.clone(), card))


# ------------------------------------------------------------------------- decode once --

def test_a_second_load_decodes_nothing_and_a_new_transform_makes_a_new_cache(tmp_path, monkeypatch):
    folder = _folder(tmp_path / "val")
    first = load_imagenet_folder(folder, SMALL)
    monkeypatch.setattr(datacache, "decode", lambda *a: pytest.fail("decoded again"))
    again = load_imagenet_folder(folder, SMALL)
    assert again.identity == first.identity and torch.equal(again.images, first.images)
    assert len(_cache_folders(tmp_path)) == 1
    monkeypatch.undo()
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))
    other = load_imagenet_folder(folder, Transform(32, SMALL.mean, SMALL.std, 1.0, "bilinear", "center"))
    assert len(_cache_folders(tmp_path)) == 2 and other.identity != first.identity


def test_only_the_normalisation_changes_shares_the_cache_not_the_identity(tmp_path):
    folder = _folder(tmp_path / "val")
    a = load_imagenet_folder(folder, SMALL)
    b = load_imagenet_folder(folder, Transform(32, (0.5,) * 3, (0.5,) * 3, 0.875, "bicubic", "center"))
    assert a.cache.folder == b.cache.folder and a.identity != b.identity


def test_identity_names_the_images_wherever_they_live(tmp_path):
    import shutil

    a = load_imagenet_folder(_folder(tmp_path / "a" / "val"), SMALL)
    shutil.copytree(tmp_path / "a" / "val", tmp_path / "b" / "val")
    b = load_imagenet_folder(tmp_path / "b" / "val", SMALL)
    assert a.identity == b.identity and len(a.identity) == 16
    assert load_imagenet_folder(tmp_path / "a" / "val", SMALL, limit=6).identity != a.identity


def test_a_changed_file_is_a_new_cache(tmp_path):
    folder = _folder(tmp_path / "val", n=6)
    a = load_imagenet_folder(folder, SMALL)
    victim = sorted(folder.glob("*/*"))[0]
    (victim.parent / "new.JPEG").write_bytes(victim.read_bytes())
    victim.unlink()
    b = load_imagenet_folder(folder, SMALL)
    assert a.cache.folder != b.cache.folder


def test_parallel_build_equals_one_process_and_reports_progress(tmp_path, progress_lines):
    folder = _folder(tmp_path / "val", n=20, gray=3)
    crop = datacache.Crop(SMALL)
    items = sorted(folder.glob("*/*"))
    listed = [datacache.Item(f"{p.parent.name}/{p.name}", 0, path=str(p)) for p in items]
    one = datacache.open_or_build(tmp_path / "c1", "k", lambda: listed, crop, "test", workers=1)
    two = datacache.open_or_build(tmp_path / "c2", "k", lambda: listed, crop, "test", workers=2)
    assert one.path.read_bytes() == two.path.read_bytes()
    assert two.header["build"]["workers"] == 2 and two.header["build"]["img_per_s_per_worker"] > 0
    assert any("2 workers" in line for line in progress_lines) and any("20/20 images" in line for line in progress_lines)
    gray = one.read([[p.name for p in items].index("img_003.JPEG")])[0]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])  # a grayscale image becomes RGB


# -------------------------------------------------------------------------------- streaming --

def test_streamed_batches_take_and_shards_equal_the_in_memory_set(tmp_path):
    s = load_imagenet_folder(_folder(tmp_path / "val", n=11), SMALL)
    mem = EvalSet("mem", s.images.clone(), s.labels.clone(), SMALL)
    streamed = [s.batch(start, min(start + 4, len(s)), CPU) for start in range(0, len(s), 4)]  # read ahead
    x, y = (torch.cat(t) for t in zip(*streamed))  # every batch intact after the pass: no buffer shared
    assert torch.equal(x, mem.batch(0, len(s), CPU)[0]) and torch.equal(y, s.labels)
    assert torch.equal(s.batch(8, 11, CPU)[0], x[8:11]) and torch.equal(s.batch(0, 2, CPU)[0], x[:2])  # out of order
    index = torch.tensor([7, 0, 10, 7, 3])
    assert all(torch.equal(a, b) for a, b in zip(s.take(index, CPU), mem.take(index, CPU)))
    shards = [s.shard(r, 3) for r in range(3)]
    assert sorted(sum((sh.labels.tolist() for sh in shards), [])) == sorted(s.labels.tolist())
    assert torch.equal(shards[1].batch(0, len(shards[1]), CPU)[0], mem.batch(0, len(s), CPU)[0][1::3])
    assert torch.equal(shards[2].images, s.images[2::3])
    assert len({s.identity, *(sh.identity for sh in shards)}) == 4


def test_reading_rows_coalesces_runs():
    assert list(datacache._runs([4, 5, 6, 9, 2, 3])) == [(0, 4, 3), (3, 9, 1), (4, 2, 2)]
    assert list(datacache._runs(range(10, 20))) == [(0, 10, 10)]
    assert list(datacache._runs(range(1, 10, 4))) == [(0, 1, 1), (1, 5, 1), (2, 9, 1)]


# ------------------------------------------------------------------------------ torn caches --

@pytest.mark.parametrize("tear", ["no_marker", "truncated", "header_changed", "other_key"])
def test_a_torn_cache_is_rebuilt_never_read(tmp_path, tear, caplog):
    folder = _folder(tmp_path / "val", n=6)
    good = load_imagenet_folder(folder, SMALL)
    want = good.images.clone()
    (cache,) = _cache_folders(tmp_path)
    if tear == "no_marker":
        (cache / "COMPLETE").unlink()
    elif tear == "truncated":
        os.truncate(cache / "crops.u8", (cache / "crops.u8").stat().st_size // 2)
    elif tear == "header_changed":
        header = json.loads((cache / "header.json").read_text())
        header["labels"] = [0] * len(header["labels"])
        (cache / "header.json").write_text(json.dumps(header))
    else:
        marker = json.loads((cache / "COMPLETE").read_text())
        (cache / "COMPLETE").write_text(json.dumps({**marker, "key": "0" * 20}))
    del good
    with caplog.at_level(logging.WARNING, logger="harness.loading.datacache"):
        again = load_imagenet_folder(folder, SMALL)
    assert "not trusted" in caplog.text
    assert torch.equal(again.images, want) and (cache / "COMPLETE").is_file()


KILLED_BUILD = """
import sys, time
from pathlib import Path
from harness.loading import datacache
from harness.loading.data import load_imagenet_folder
from harness.loading.models import Transform

crop_item = datacache._crop_item
def slow(item, crop):
    time.sleep(0.2)
    return crop_item(item, crop)
datacache._crop_item = slow
load_imagenet_folder(Path(sys.argv[1]), Transform(32, (0.5,) * 3, (0.5,) * 3, 0.875, "bicubic", "center"))
"""


@pytest.mark.slow
def test_a_build_killed_midway_leaves_nothing_a_later_run_trusts(tmp_path):
    folder = _folder(tmp_path / "val", n=24)
    env = {**os.environ, "HARNESS_CACHE_DIR": str(tmp_path / "cache"), "HARNESS_DATA_WORKERS": "2",
           "PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(folder)], env=env, start_new_session=True)
    data = tmp_path / "cache" / "data"
    try:
        deadline = time.monotonic() + 60
        while not list(data.glob(".build-*/crops.u8")):
            assert proc.poll() is None and time.monotonic() < deadline, "the build never started"
            time.sleep(0.05)
        time.sleep(0.5)  # some rows written, far from all (24 images x 0.2 s over 2 workers)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the builder and its workers
        proc.wait()
    assert list(data.glob(".build-*")) and not _cache_folders(tmp_path)  # nothing in a trusted place
    s = load_imagenet_folder(folder, Transform(32, (0.5,) * 3, (0.5,) * 3, 0.875, "bicubic", "center"))
    assert len(s) == 24 and not list(data.glob(".build-*"))  # the leftover is cleared, the cache built whole
    crop = datacache.Crop(s.transform)
    from PIL import Image

    first = sorted(folder.glob("*/*"))[0]
    assert torch.equal(s.images[0], torch.from_numpy(crop(Image.open(first).convert("RGB"))))


def test_not_enough_disk_is_one_clear_error(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from harness.errors import HarnessError

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10, 10, 1000))
    with pytest.raises(HarnessError, match="needs .* GB.*HARNESS_CACHE_DIR"):
        load_imagenet_folder(_folder(tmp_path / "val", n=3), SMALL)
    assert not list((tmp_path / "cache" / "data").glob(".build-*"))



def test_two_sweeps_asking_at_once_build_the_cache_once(tmp_path, monkeypatch):
    """The lock is an flock on its own open file: two threads contend for it as two processes do."""
    import threading

    folder = _folder(tmp_path / "val", n=8)
    monkeypatch.setenv("HARNESS_DATA_WORKERS", "1")
    builds, build = [], datacache.build

    def counted(*args, **kwargs):
        builds.append(1)
        time.sleep(0.5)  # long enough for the other to find the lock held
        return build(*args, **kwargs)

    monkeypatch.setattr(datacache, "build", counted)
    out = {}
    threads = [threading.Thread(target=lambda k=k: out.update({k: load_imagenet_folder(folder, SMALL)})) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and torch.equal(out[0].images, out[1].images)


def test_a_cache_dir_that_cannot_be_made_is_one_clear_error(tmp_path, monkeypatch):
    from harness.errors import HarnessError

    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "file" / "sub"))
    with pytest.raises(HarnessError, match="cannot be made.*HARNESS_CACHE_DIR"):
        load_imagenet_folder(_folder(tmp_path / "val", n=2), SMALL)
