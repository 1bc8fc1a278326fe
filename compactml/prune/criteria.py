"""Pruning criteria and the masks they give: pure functions on tensors.

A *score* tensor has the shape of a weight; a higher score means a more important weight. A
*mask* is a bool tensor of the same shape, True where the weight is kept.

- :func:`magnitude_scores`: ``|w|`` (Han et al. 2015, "Learning both Weights and Connections
  for Efficient Neural Networks").
- :func:`taylor_scores`: first-order Taylor importance ``|w * dL/dw|`` accumulated over
  training batches (Molchanov et al. 2019, "Importance Estimation for Neural Network Pruning").
- :func:`layer_mask` / :func:`global_masks`: prune an exact count of the lowest scores, per
  layer or with one threshold over all layers together.
- :func:`nm_mask`: N:M semi-structured sparsity, n kept in every m consecutive input weights
  (Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks").

Ties are broken deterministically: among equal scores the one with the lower flat index (in
:func:`global_masks`, the earlier layer) is pruned first. A score of ``-inf`` marks a weight that
is already pruned, so it goes first.
"""

from __future__ import annotations

import torch
from torch import nn

from compactml.errors import CompactMLError
from compactml.task import Task, eval_mode


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """``|weight|`` in float32: the magnitude criterion (Han et al. 2015)."""
    return weight.detach().float().abs()


def taylor_sums(
    model: nn.Module, task: Task, weights: list[torch.Tensor], batches: int
) -> list[torch.Tensor]:
    """``|w * dL/dw|`` summed over the first ``batches`` batches of ``task.train``, one float32
    tensor for each of ``weights`` (leaf tensors of ``model``, its parameters).

    The loss is ``task.batch_loss``, differentiated with respect to the weights only (Molchanov
    et al. 2019: the first-order estimate of the loss change when a weight is removed). The
    model runs in eval mode (BatchNorm statistics and dropout are left alone); a weight that
    does not require grad is made to for the sums and then set back, and no ``.grad`` is
    touched, so the model is left as it was. Unstructured, N:M and channel pruning all score
    with this one function.
    """
    sums = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    frozen = [w for w in weights if not w.requires_grad]
    seen = 0
    try:
        for weight in frozen:
            weight.requires_grad_(True)
        with eval_mode(model), torch.enable_grad():
            for batch in task.batches("train", batches):
                loss = task.batch_loss(model, batch)
                if not bool(torch.isfinite(loss)):
                    raise CompactMLError(
                        f"the loss is {float(loss.detach())} on a training batch, so Taylor "
                        "scores cannot be computed; check the model's weights and the task's "
                        "train data"
                    )
                grads = torch.autograd.grad(loss, weights, allow_unused=True)
                for total, weight, grad in zip(sums, weights, grads, strict=True):
                    if grad is not None:
                        total += (weight.detach() * grad).float().abs()
                seen += 1
    finally:
        for weight in frozen:
            weight.requires_grad_(False)
    if seen == 0:
        raise CompactMLError("task.train gave no batch; Taylor scores need training batches")
    return sums


def taylor_scores(
    model: nn.Module, task: Task, names: list[str], batches: int
) -> dict[str, torch.Tensor]:
    """First-order Taylor importance ``{name: |w * dL/dw| summed}`` of the weight of each
    module called ``names``, over the first ``batches`` batches of ``task.train`` (see
    :func:`taylor_sums`; the model is not modified)."""
    weights = [model.get_submodule(name).weight for name in names]
    return dict(zip(names, taylor_sums(model, task, weights, batches), strict=True))


def check_sparsity(sparsity: float) -> None:
    """Raise CompactMLError unless ``sparsity`` is a number in [0, 1)."""
    if (
        isinstance(sparsity, bool)
        or not isinstance(sparsity, int | float)
        or not (0 <= sparsity < 1)
    ):
        raise CompactMLError(
            f"sparsity must be a fraction in [0, 1) such as 0.5 (the share of weights set to "
            f"zero), got {sparsity!r}"
        )


def _check_scores(scores: torch.Tensor) -> None:
    if bool(torch.isnan(scores).any()):
        raise CompactMLError("pruning scores hold NaN; check the layer's weights for NaN values")


def _lowest(flat: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` lowest entries of 1-D ``flat``, ties by lower index first."""
    return torch.argsort(flat, stable=True)[:count]


def layer_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask pruning exactly ``round(sparsity * numel)`` of the lowest ``scores``."""
    check_sparsity(sparsity)
    _check_scores(scores)
    flat = scores.detach().float().reshape(-1)
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[_lowest(flat, round(sparsity * flat.numel()))] = False
    return keep.reshape(scores.shape)


def global_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Keep-masks from one threshold over all layers' ``scores`` together: exactly
    ``round(sparsity * total)`` of the lowest scores are pruned, wherever they are (layers in
    the order given)."""
    check_sparsity(sparsity)
    if not scores:
        return {}
    for value in scores.values():
        _check_scores(value)
    flat = torch.cat([s.detach().float().reshape(-1) for s in scores.values()])
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[_lowest(flat, round(sparsity * flat.numel()))] = False
    masks, start = {}, 0
    for name, value in scores.items():
        masks[name] = keep[start : start + value.numel()].reshape(value.shape)
        start += value.numel()
    return masks


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with the ``n`` highest of every ``m`` consecutive scores along dim 1, the
    input dimension of a Linear ``(out, in)`` or ConvNd ``(out, in, *kernel)`` weight (for a
    convolution: at each output channel and kernel position). ``NM(2, 4)``: 2 of every 4.

    Raises CompactMLError when dim 1 is not divisible by ``m``. Equal scores keep the earlier
    weight of the group.
    """
    if not 1 <= n <= m:
        raise CompactMLError(f"N:M needs 1 <= n <= m, got n={n}, m={m}; use e.g. n=2, m=4")
    if scores.dim() < 2:
        raise CompactMLError(f"N:M needs a weight with an input dimension, got {scores.dim()}-D")
    width = scores.shape[1]
    if width % m:
        raise CompactMLError(
            f"the input width {width} is not divisible by m={m}; exclude the layer or pick an m "
            f"that divides {width}"
        )
    _check_scores(scores)
    moved = scores.detach().float().movedim(1, -1)  # (out, *kernel, in)
    groups = moved.reshape(*moved.shape[:-1], width // m, m)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :n]
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True)
    return keep.reshape(moved.shape).movedim(-1, 1).contiguous()
