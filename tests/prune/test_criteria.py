"""The pruning criteria and masks from scores: pure functions, checked by hand on small tensors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compactml.errors import CompactMLError
from compactml.prune import criteria
from compactml.task import Task


def test_magnitude_scores_are_absolute_values_in_float32():
    w = torch.tensor([[-3.0, 1.0], [0.5, -0.25]], dtype=torch.float16)
    scores = criteria.magnitude_scores(w)
    assert scores.dtype == torch.float32
    assert torch.equal(scores, torch.tensor([[3.0, 1.0], [0.5, 0.25]]))


def test_layer_mask_prunes_the_lowest_exact_count():
    scores = torch.tensor([3.0, 1.0, 2.0, 0.5])
    assert criteria.layer_mask(scores, 0.5).tolist() == [True, False, True, False]
    assert criteria.layer_mask(scores, 0.0).all()
    assert criteria.layer_mask(scores, 0.74).tolist() == [True, False, False, False]  # round(2.96)


def test_layer_mask_count_is_rounded_and_shape_kept():
    scores = torch.arange(10.0).reshape(2, 5)
    mask = criteria.layer_mask(scores, 0.33)  # round(3.3) = 3 pruned
    assert mask.shape == (2, 5) and mask.dtype == torch.bool
    assert (~mask).sum() == 3
    assert mask.reshape(-1).tolist() == [False] * 3 + [True] * 7


def test_ties_are_broken_by_index():
    mask = criteria.layer_mask(torch.ones(6), 0.5)
    assert mask.tolist() == [False, False, False, True, True, True]
    assert torch.equal(mask, criteria.layer_mask(torch.ones(6), 0.5))


def test_minus_inf_scores_are_pruned_first():
    scores = torch.tensor([5.0, float("-inf"), 1.0, 2.0])
    assert criteria.layer_mask(scores, 0.25).tolist() == [True, False, True, True]
    assert criteria.layer_mask(scores, 0.5).tolist() == [True, False, False, True]


def test_global_masks_use_one_threshold_over_all_layers():
    scores = {"a": torch.tensor([10.0, 20.0, 30.0, 40.0]), "b": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    masks = criteria.global_masks(scores, 0.5)
    assert masks["a"].all() and not masks["b"].any()
    masks = criteria.global_masks(scores, 0.625)  # 5 of 8: all of b and the lowest of a
    assert masks["a"].tolist() == [False, True, True, True] and not masks["b"].any()
    per_layer = criteria.layer_mask(scores["a"], 0.5)
    assert per_layer.tolist() == [False, False, True, True]  # the layer scope differs


def test_global_masks_keep_shapes_and_count():
    torch.manual_seed(0)
    scores = {"x": torch.rand(3, 4), "y": torch.rand(5), "z": torch.rand(2, 2, 2)}
    masks = criteria.global_masks(scores, 0.4)
    assert {k: tuple(v.shape) for k, v in masks.items()} == {
        k: tuple(v.shape) for k, v in scores.items()
    }
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.4 * 25)
    pruned = torch.cat([scores[k][~masks[k]] for k in scores])
    kept = torch.cat([scores[k][masks[k]] for k in scores])
    assert pruned.max() <= kept.min()
    assert criteria.global_masks({}, 0.5) == {}


def test_nm_mask_linear_by_hand():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.1, 0.2, 0.4, 0.3], [1.0, 1.0, 1.0, 1.0] * 2])
    mask = criteria.nm_mask(scores, 2, 4)
    assert mask[0].tolist() == [True, False, True, False, False, False, True, True]
    assert mask[1].tolist() == [True, True, False, False] * 2  # ties: the earlier ones stay


def test_nm_mask_conv_groups_along_input_channels():
    torch.manual_seed(0)
    scores = torch.rand(3, 8, 2, 2)
    mask = criteria.nm_mask(scores, 2, 4)
    assert mask.shape == scores.shape
    groups = mask.movedim(1, -1).reshape(3, 2, 2, 2, 4)  # (out, kh, kw, group, m)
    assert torch.equal(groups.sum(-1), torch.full((3, 2, 2, 2), 2))
    values = scores.movedim(1, -1).reshape(3, 2, 2, 2, 4)
    kept_min = values.masked_fill(~groups, float("inf")).min(-1).values
    pruned_max = values.masked_fill(groups, float("-inf")).max(-1).values
    assert (kept_min > pruned_max).all()


def test_nm_mask_one_of_two_and_all_kept():
    scores = torch.tensor([[1.0, 2.0, 4.0, 3.0]])
    assert criteria.nm_mask(scores, 1, 2).tolist() == [[False, True, True, False]]
    assert criteria.nm_mask(scores, 4, 4).all()


@pytest.mark.parametrize(("n", "m", "shape"), [(3, 2, (2, 4)), (0, 4, (2, 4)), (2, 4, (2, 6))])
def test_nm_mask_refuses_bad_arguments(n, m, shape):
    with pytest.raises(CompactMLError):
        criteria.nm_mask(torch.rand(shape), n, m)


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5, True, "0.5", float("nan")])
def test_bad_sparsity_is_refused(sparsity):
    with pytest.raises(CompactMLError, match=r"\[0, 1\)"):
        criteria.layer_mask(torch.rand(4), sparsity)


def test_nan_scores_are_refused():
    with pytest.raises(CompactMLError, match="NaN"):
        criteria.layer_mask(torch.tensor([1.0, float("nan")]), 0.5)


def _regression_task(batches):
    return Task(train=batches, loss=lambda out, target: ((out - target) ** 2).mean())


def test_taylor_scores_by_hand():
    layer = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 1.0]]))
    model = nn.Sequential(layer)
    batch = (torch.tensor([[1.0, 10.0]]), torch.tensor([[0.0]]))
    task = _regression_task([batch, batch, batch])
    # out = 11, L = 121, dL/dw = 2 * 11 * x = [22, 220]; |w * g| summed over 2 batches.
    scores = criteria.taylor_scores(model, task, ["0"], batches=2)
    assert torch.allclose(scores["0"], torch.tensor([[44.0, 440.0]]))
    assert layer.weight.grad is None
    assert torch.equal(layer.weight, torch.tensor([[1.0, 1.0]]))


def test_taylor_scores_follow_gradients_not_magnitudes():
    layer = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2.0, 1.0]]))
    # Feature 0 is always zero: its weight never changes the loss, however large it is.
    batch = (torch.tensor([[0.0, 1.0], [0.0, 2.0]]), torch.tensor([[0.0], [0.0]]))
    scores = criteria.taylor_scores(nn.Sequential(layer), _regression_task([batch]), ["0"], 4)
    assert scores["0"][0, 0] == 0 and scores["0"][0, 1] > 0
    assert criteria.layer_mask(scores["0"], 0.5).tolist() == [[False, True]]
    magnitude = criteria.magnitude_scores(layer.weight)
    assert criteria.layer_mask(magnitude, 0.5).tolist() == [[True, False]]


def test_taylor_scores_refuse_a_non_finite_loss_and_empty_data():
    model = nn.Sequential(nn.Linear(2, 1))
    bad = Task(train=[(torch.ones(1, 2), torch.zeros(1, 1))], loss=lambda o, t: o.sum() / 0.0)
    with pytest.raises(CompactMLError, match="loss"):
        criteria.taylor_scores(model, bad, ["0"], 1)
    with pytest.raises(CompactMLError, match="no batch"):
        criteria.taylor_scores(model, _regression_task([]), ["0"], 1)
