"""Decision margins (harness/margins.py) and the golden-logit rule that reads them (harness/measurement/fidelity.py)."""
from __future__ import annotations

import math

import pytest
import timm
import torch

from harness import margins
from harness.measurement.fidelity import MAX_NEAR_TIE_IMAGES, NEAR_TIE_RELATIVE, judge
from harness.margins import Margin
from harness.methods.evit import select_tokens
from harness.registry import make_method
from harness.schedule import arch_spec


def _entries(fn) -> list:
    """What ``fn()`` noted inside a recording (no model: block -1)."""
    with margins.recording(torch.nn.Module()) as log:
        fn()
    return [(decision, rel.tolist()) for _, decision, rel in log.entries]


def test_a_cut_notes_the_gap_between_the_last_kept_and_the_first_dropped():
    scores = torch.tensor([[3.0, 1.9, 2.0, 0.0], [-4.0, 1.0, 0.5, 0.25]])
    [(decision, rel)] = _entries(lambda: margins.note_boundary(scores, 2, "keep"))
    assert decision == "keep"
    assert rel == pytest.approx([0.1 / 3.0, 0.25 / 4.0])


def test_best_partner_margins_only_count_the_rows_that_act():
    scores = torch.tensor([[[0.9, 0.9, 0.1], [0.8, 0.2, -math.inf], [0.5, -math.inf, -math.inf]]])
    [(_, every)] = _entries(lambda: margins.note_best(scores, None, "p"))
    assert every == [0.0]  # row 0 is an exact tie
    [(_, acting)] = _entries(lambda: margins.note_best(scores, torch.tensor([[1, 2]]), "p"))
    assert acting == pytest.approx([0.6 / 0.8])  # row 2 has one real candidate: no tie possible
    assert _entries(lambda: margins.note_best(scores, torch.zeros(1, 0, dtype=torch.long), "p")) == []


def test_an_order_notes_its_closest_neighbours_and_a_threshold_its_distance():
    [(_, rel)] = _entries(lambda: margins.note_order(torch.tensor([[1.0, 4.0, 2.0, 1.5]]), "order"))
    assert rel == pytest.approx([0.5 / 4.0])
    [(_, rel)] = _entries(lambda: margins.note_threshold(torch.tensor([2.0, 1.0, 0.5]), 1.0, "branch"))
    assert rel == pytest.approx([0.5, 0.0, 0.5])


def test_the_closest_pair_is_compared_with_the_next_pair_not_its_own_mirror():
    inf = math.inf
    dist = torch.tensor([[[inf, 1.0, 3.0], [1.0, inf, 1.5], [3.0, 1.5, inf]]])
    [(_, rel)] = _entries(lambda: margins.note_lowest_pair(dist, "pair"))
    assert rel == pytest.approx([0.5 / 3.0])


def test_nothing_is_noted_outside_a_recording():
    margins.note_boundary(torch.rand(2, 5), 2, "keep")  # no log: returns, records nowhere
    assert margins._LOG is None
    with margins.recording(torch.nn.Module()) as log:
        pass
    assert margins._LOG is None and log.entries == [] and log.closest(0) is None


def test_an_exact_tie_at_evits_cut_is_noted_at_its_block():
    x = torch.randn(1, 5, 4)
    cls_attn = torch.tensor([[0.5, 0.3, 0.2, 0.2, 0.1]])  # the 2nd and 3rd candidates tie at keep = 2
    with margins.recording(torch.nn.Module()) as log:
        log.block = 6
        select_tokens(x, cls_attn, keep_rate=0.5, num_prefix=1, fuse=False)
    assert log.closest(0) == Margin(0.0, 6, "class-attention keep")


def test_a_patched_models_margins_carry_the_blocks_that_decided():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=64).eval()
    method = make_method("tome", {"tome": {"r_list": [0, 3, 0, 2]}})
    method.patch(model, 3, arch_spec(model))
    with torch.inference_mode(), margins.recording(model) as log:
        model(torch.randn(2, 3, 64, 64))
    assert {block for block, _, _ in log.entries} == {1, 3}
    assert {decision for _, decision, _ in log.entries} == {"bipartite merge rank", "bipartite partner"}
    assert all(rel.shape == (2,) and bool((rel >= 0).all()) for _, _, rel in log.entries)


# ----------------------------------------------------------------------------- the rule

TIE = Margin(NEAR_TIE_RELATIVE / 10, 9, "mctf A->B partner")
WIDE = Margin(NEAR_TIE_RELATIVE * 10, 9, "mctf A->B partner")


def test_every_image_within_the_bound_passes_with_no_tie():
    verdict = judge([1e-6, 3e-6], [True, True], [None, WIDE], atol=1e-4)
    assert verdict.ok and verdict.near_ties == ()


def test_one_image_beyond_the_bound_passes_only_at_a_near_tie():
    verdict = judge([1e-6, 0.07], [True, True], [WIDE, TIE], atol=1e-4)
    assert verdict.ok and [t.image for t in verdict.near_ties] == [1]
    assert "image 1" in str(verdict.near_ties[0]) and "block 9" in str(verdict.near_ties[0])
    assert not judge([1e-6, 0.07], [True, True], [TIE, WIDE], atol=1e-4).ok  # the tie is another image's
    assert not judge([1e-6, 0.07], [True, True], [TIE, None], atol=1e-4).ok  # nothing noted: no excuse


def test_a_tie_never_excuses_a_changed_prediction_or_a_second_image():
    assert not judge([0.07], [False], [TIE], atol=1e-4).ok
    many = judge([0.07] * (MAX_NEAR_TIE_IMAGES + 1), [True] * (MAX_NEAR_TIE_IMAGES + 1),
                 [TIE] * (MAX_NEAR_TIE_IMAGES + 1), atol=1e-4)
    assert not many.ok and "at most" in many.failures[-1]


def test_an_order_can_be_noted_over_some_ranks_only():
    scores = torch.tensor([[9.0, 8.0, 7.9, 5.0, 4.99, 1.0]])
    whole = _entries(lambda: margins.note_order(scores, "o"))[0][1]
    head = _entries(lambda: margins.note_order(scores, "o", to_rank=2))[0][1]  # ranks 0, 1 and the cut at 2
    tail = _entries(lambda: margins.note_order(scores, "o", from_rank=4))[0][1]  # the cut at 4 and ranks 4, 5
    near = dict(rel=1e-4)  # 4.99 in float32
    assert whole == pytest.approx([0.01 / 9], **near) and tail == pytest.approx([0.01 / 9], **near)
    assert head == pytest.approx([0.1 / 9], **near)
    assert _entries(lambda: margins.note_order(scores, "o", from_rank=6)) == []
