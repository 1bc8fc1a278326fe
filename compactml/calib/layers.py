"""Which Linear layers a calibration-based method works on: one selection for GPTQ, AWQ,
SparseGPT and Wanda, so that they refuse the same bad input with the same words."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from compactml.config import Technique
from compactml.errors import CompactMLError
from compactml.quantize import affine
from compactml.quantize.affine import QScheme


def select_linears(
    technique: Technique,
    model: nn.Module,
    *,
    verb: str,
    instead: str,
    check: Callable[[nn.Linear], str | None] | None = None,
) -> tuple[dict[str, nn.Linear], dict[str, str]]:
    """The ``nn.Linear`` layers of ``model`` selected by ``technique``'s include/exclude that
    it can compress, and the others with the reason: ``check(layer)`` (a reason or None), or
    non-finite weights.

    ``verb`` ("quantized", "pruned") and ``instead`` (which config handles other layer types)
    word the errors: no Linear layer at all, none selected, or none usable.
    """
    who = type(technique).__name__
    if not any(type(m) is nn.Linear for m in model.modules()):
        raise CompactMLError(
            f"the model ({type(model).__name__}) has no nn.Linear layer; {who} works on Linear "
            f"layers ({instead})"
        )
    chosen = technique.targets(model, (nn.Linear,))
    if not chosen:
        raise CompactMLError(
            f"{who} found no Linear layer selected by include={list(technique.include)} "
            f"exclude={list(technique.exclude)}; check the patterns against the model's module "
            "names"
        )
    layers: dict[str, nn.Linear] = {}
    skipped: dict[str, str] = {}
    for name, layer in chosen:
        reason = check(layer) if check is not None else None
        if reason is None and not bool(torch.isfinite(layer.weight).all()):
            reason = "the weight has NaN or Inf values"
        if reason is None:
            layers[name] = layer
        else:
            skipped[name] = reason
    if not layers:
        name, reason = next(iter(skipped.items()))
        raise CompactMLError(
            f"{who}: no selected layer can be {verb} ({name or 'model'}: {reason}); select "
            "other layers with include/exclude"
        )
    return layers, skipped


def quantizable_linears(
    technique: Technique, model: nn.Module, scheme: QScheme
) -> tuple[dict[str, nn.Linear], dict[str, str]]:
    """:func:`select_linears` for a weight quantizer writing codes in ``scheme``: a layer whose
    shape the scheme's groups do not fit stays float, with the reason."""

    def check(layer: nn.Linear) -> str | None:
        try:
            affine.param_shape(tuple(layer.weight.shape), scheme.granularity)
        except CompactMLError as exc:
            return str(exc)
        return None

    return select_linears(
        technique,
        model,
        verb="quantized",
        instead="use WeightOnly for Conv2d and Embedding layers",
        check=check,
    )
