"""Weight-only quantization of the built-in real models (marked slow; they train or load once)."""

from __future__ import annotations

import pytest

from compactml.evaluate import evaluate
from compactml.examples import digits_cnn
from compactml.quantize import QuantConv2d, QuantLinear, WeightOnly, quantize


@pytest.mark.slow
def test_digits_cnn_int8_weights_lose_at_most_half_a_point():
    model, task = digits_cnn.load(progress=False)
    baseline = evaluate(model, task)["top1"]
    quantized = quantize(model, WeightOnly(bits=8, group_size=None))
    layers = [m for m in quantized.modules() if isinstance(m, QuantConv2d | QuantLinear)]
    assert len(layers) == 4  # three convolutions and the classifier
    assert evaluate(quantized, task)["top1"] >= baseline - 0.005
