"""The report's statistics against values computed by hand."""
import numpy as np
import pytest

from harness.measurement.stats import Paired, load_predictions, mcnemar, mcnemar_exact, paired_test, ratio_summary, wilson


def test_wilson_by_hand():
    # 8/10, z = 1.95996, z^2 = 3.84146: denominator 1 + z^2/n = 1.384146;
    # centre (0.8 + z^2/20) / 1.384146 = 0.992073 / 1.384146 = 0.716740;
    # half-width z * sqrt(0.8 * 0.2 / 10 + z^2 / 400) / 1.384146 = 1.95996 * 0.160011 / 1.384146 = 0.226578
    assert wilson(8, 10) == pytest.approx((0.716740 - 0.226578, 0.716740 + 0.226578), abs=2e-6)
    assert wilson(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    # 400/500: denominator 1.0076829; centre 0.8038415 / 1.0076829 = 0.797713;
    # half-width 1.95996 * sqrt(0.00032 + 0.00000384146) / 1.0076829 = 1.95996 * 0.0179956 / 1.0076829 = 0.035002
    assert wilson(400, 500) == pytest.approx((0.762711, 0.832715), abs=2e-6)
    # the interval is not symmetric about k/n: it leans toward 1/2
    low, high = wilson(400, 500)
    assert 0.8 - low > high - 0.8
    # 0/10: the upper end is z^2 / (n + z^2) = 3.84146 / 13.84146 = 0.277533; the lower end exactly 0
    assert wilson(0, 10) == pytest.approx((0.0, 0.277533), abs=2e-6)
    assert wilson(10, 10)[1] == 1.0 and wilson(0, 10)[0] == 0.0


def test_wilson_width_shrinks_with_n_as_the_style_guide_says():
    # STYLE.md: +-3.5 points at 80 % on 500 images, +-0.8 on 10,000
    for n, half in ((500, 0.035), (10_000, 0.008)):
        low, high = wilson(int(0.8 * n), n)
        assert (high - low) / 2 == pytest.approx(half, abs=0.001)


@pytest.mark.parametrize("k,n", [(-1, 10), (11, 10), (0, 0)])
def test_wilson_refuses_impossible_counts(k, n):
    with pytest.raises(ValueError):
        wilson(k, n)


@pytest.mark.parametrize("b,c,p", [
    (1, 9, 22 / 1024),  # 2 * (C(10,0) + C(10,1)) / 2^10 = 2 * 11 / 1024 = 0.021484375
    (9, 1, 22 / 1024),  # symmetric
    (0, 5, 2 / 32),  # 0.0625: five discordant pairs all one way are not enough at 5 %
    (0, 6, 2 / 64),  # 0.03125: six are
    (2, 12, 2 * (1 + 14 + 91) / 2 ** 14),  # 0.012939453125
    (3, 3, 1.0),  # b = c: no evidence either way
    (0, 0, 1.0),  # no discordant pairs at all
])
def test_mcnemar_exact_by_hand(b, c, p):
    assert mcnemar_exact(b, c) == pytest.approx(p, rel=1e-12)


def test_mcnemar_exact_large_counts_stay_exact():
    # all discordant pairs one way: p = 2 / 2^n, far below what floats of a normal approximation resolve
    assert mcnemar_exact(0, 200) == pytest.approx(2.0 ** -199, rel=1e-12)
    assert mcnemar_exact(500, 500) == 1.0


def test_mcnemar_counts_the_discordant_pairs():
    a = [1, 1, 1, 0, 0, 1, 0]
    b = [1, 0, 0, 1, 0, 1, 0]
    # a right, b wrong: images 1 and 2; b right, a wrong: image 3
    assert mcnemar(a, b) == Paired(2, 1, 1.0)
    with pytest.raises(ValueError):
        mcnemar([1, 0], [1])


def _predictions(tmp_path, name, pred, label):
    path = tmp_path / "predictions" / f"{name}.npz"
    path.parent.mkdir(exist_ok=True)
    np.savez(path, pred=np.array(pred), label=np.array(label))
    return f"predictions/{name}.npz"


def test_paired_test_reads_prediction_files(tmp_path):
    label = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    a = {"predictions": _predictions(tmp_path, "a", label, label), "eval_set_sha": "s1"}  # all right
    b = {"predictions": _predictions(tmp_path, "b", [9] * 9 + [9], label), "eval_set_sha": "s1"}  # right on the last only
    assert load_predictions(tmp_path / a["predictions"])[1].tolist() == label
    assert paired_test(a, b, tmp_path) == Paired(9, 0, 2 / 2 ** 9)
    assert paired_test(b, a, tmp_path) == Paired(0, 9, 2 / 2 ** 9)


def test_paired_test_refuses_what_is_not_paired(tmp_path):
    label = [0, 1, 2, 3]
    a = {"predictions": _predictions(tmp_path, "a", label, label), "eval_set_sha": "s1"}
    other_set = {"predictions": _predictions(tmp_path, "b", label, label), "eval_set_sha": "s2"}
    shorter = {"predictions": _predictions(tmp_path, "c", label[:3], label[:3]), "eval_set_sha": "s1"}
    reordered = {"predictions": _predictions(tmp_path, "d", label[::-1], label[::-1]), "eval_set_sha": "s1"}
    gone = {"predictions": "predictions/missing.npz", "eval_set_sha": "s1"}
    old = {"top1": 0.8}  # a record from before prediction files
    for rec in (other_set, shorter, reordered, gone, old):
        assert paired_test(a, rec, tmp_path) is None
    assert paired_test({**a, "eval_set_sha": None}, {**a, "eval_set_sha": None}, tmp_path) is None
    assert paired_test(a, a, tmp_path) == Paired(0, 0, 1.0)


def test_ratio_summary_by_hand():
    # sorted 0.9 1.0 1.1 1.2 1.3: median 1.1; quartiles at positions 1 and 3 of 0..4 (numpy's linear rule)
    s = ratio_summary([1.1, 1.3, 0.9, 1.2, 1.0])
    assert (s.median, s.q1, s.q3) == pytest.approx((1.1, 1.0, 1.2))
    assert s.spread == pytest.approx(0.2 / 1.1)
    # 1 2 3 4: q1 at position 0.75 -> 1.75, q3 at 2.25 -> 3.25, median 2.5; spread 1.5 / 2.5
    s = ratio_summary([4, 1, 3, 2])
    assert (s.median, s.q1, s.q3, s.spread) == pytest.approx((2.5, 1.75, 3.25, 0.6))
    assert (s.q1, s.q3) == pytest.approx(tuple(np.percentile([1, 2, 3, 4], [25, 75])))
    assert ratio_summary([1.2]) == (1.2, 1.2, 1.2, 0.0)
    with pytest.raises(ValueError):
        ratio_summary([])
