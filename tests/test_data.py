import pytest
import torch

from harness.loading.data import balanced_subset, load_cifar10, load_imagenet_folder, stretch_and_normalize
from harness.errors import HarnessError
from harness.loading.models import Transform

IMAGENET_T = Transform(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0.875, "bicubic")


@pytest.fixture(autouse=True)
def _cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))


def test_balanced_subset_takes_first_k_of_each_class():
    labels = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert balanced_subset(labels, 6) == [0, 1, 3, 4, 6, 7]
    assert balanced_subset(labels, 4) == [0, 1, 3, 6]
    assert balanced_subset(labels, 0) == list(range(9))


def test_stretch_is_exact_on_constant_image():
    t = Transform(8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    x = torch.full((1, 3, 4, 4), 255, dtype=torch.uint8)
    torch.testing.assert_close(stretch_and_normalize(x, t), torch.full((1, 3, 8, 8), 2.0))


def test_cifar10_test_split(shared):
    s = load_cifar10(shared, "test", Transform(224, (0.5,) * 3, (0.5,) * 3), limit=30)
    assert s.images.shape == (30, 3, 32, 32) and s.images.dtype == torch.uint8
    assert torch.bincount(s.labels, minlength=10).tolist() == [3] * 10
    x, y = s.batch(0, 4, torch.device("cpu"))
    assert x.shape == (4, 3, 224, 224) and x.min() >= -1 and x.max() <= 1


def test_imagenet_folder_maps_synsets_to_1000_class_index(shared):
    s = load_imagenet_folder(shared / "datasets/imagenet-sample/val", IMAGENET_T)
    assert len(s) == 100 and s.images.shape[1:] == (3, 224, 224)
    # the sample holds every 10th class, one image each: labels 0, 10, ..., 990
    assert s.labels.tolist() == list(range(0, 1000, 10))


def test_imagenet_folder_errors(tmp_path):
    with pytest.raises(HarnessError, match="not found"):
        load_imagenet_folder(tmp_path / "nope", IMAGENET_T)
    (tmp_path / "val" / "cats").mkdir(parents=True)
    with pytest.raises(HarnessError, match="synset"):
        load_imagenet_folder(tmp_path / "val", IMAGENET_T)


def test_unreadable_image_is_one_clear_error(tmp_path):
    d = tmp_path / "val" / "n01440764"
    d.mkdir(parents=True)
    (d / "bad.JPEG").write_bytes(b"not a jpeg")
    with pytest.raises(HarnessError, match="unreadable image .*bad.JPEG"):
        load_imagenet_folder(tmp_path / "val", IMAGENET_T)
    assert not list((tmp_path / "cache").glob("data/*/COMPLETE"))  # a failed build leaves no cache


def test_truncated_archive(tmp_path, shared):
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets/cifar10-jpeg.tar.gz").write_bytes((shared / "datasets/cifar10-jpeg.tar.gz").read_bytes()[:100000])
    with pytest.raises(HarnessError, match="unreadable or truncated"):
        load_cifar10(tmp_path, "test", IMAGENET_T)


def test_grayscale_image_becomes_rgb(tmp_path):
    from PIL import Image

    d = tmp_path / "val" / "n01443537"
    d.mkdir(parents=True)
    Image.new("L", (40, 30), color=128).save(d / "gray.JPEG")
    s = load_imagenet_folder(tmp_path / "val", IMAGENET_T)
    assert s.images.shape == (1, 3, 224, 224) and s.labels.tolist() == [1]
    # every channel of a gray image carries the same value before normalisation
    assert torch.equal(s.images[0, 0], s.images[0, 1]) and torch.equal(s.images[0, 1], s.images[0, 2])


def test_take_equals_the_single_image_batches():
    from harness.loading.data import EvalSet
    from harness.loading.models import Transform

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, generator=g)
    t = Transform(img_size=16, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    index = torch.tensor([4, 0, 5, 4])
    for evalset in (EvalSet("u8", images, torch.arange(6), t), EvalSet("syn", None, None, t, num_synthetic=6)):
        x, y = evalset.take(index, torch.device("cpu"))
        parts = [evalset.batch(int(i), int(i) + 1, torch.device("cpu")) for i in index]
        assert torch.equal(x, torch.cat([p[0] for p in parts]))
        assert (y is None) == (parts[0][1] is None)
        if y is not None:
            assert y.tolist() == [4, 0, 5, 4]
