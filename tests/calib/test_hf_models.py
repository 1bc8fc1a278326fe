"""GPTQ through the block runner on tiny Hugging Face models (Llama decoder, BERT encoder)."""

from __future__ import annotations

import pytest
import torch

from compactml.config import history
from compactml.quantize import QuantLinear, WeightOnly
from compactml.quantize.gptq import GPTQ
from compactml.task import Task, primary_output, split_batch

pytest.importorskip("transformers")


def _error(model: torch.nn.Module, other: torch.nn.Module, task: Task) -> float:
    total = 0.0
    with torch.no_grad():
        for batch in task.batches("calib"):
            inputs = split_batch(batch)[0]
            a, b = primary_output(model(**inputs)), primary_output(other(**inputs))
            total += float((a - b).norm() / a.norm())
    return total


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_bert"])
def test_gptq_quantizes_every_block_and_beats_round_to_nearest(models, name):
    model = getattr(models, name)()
    task = models.token_task(padded=True, batches=3)
    quantized = GPTQ(bits=3, group_size=32, progress=False).apply(model, task)
    linears = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert [n for n, m in quantized.named_modules() if isinstance(m, QuantLinear)] == linears
    (entry,) = history(quantized)
    assert len(entry["gptq"]["blocks"]) == 2 and entry["gptq"]["calib_batches"] == 3
    rtn = WeightOnly(bits=3, group_size=32, exclude=("*embed*",)).apply(model)
    # random weights give nearly isotropic inputs (little for GPTQ to exploit), yet it wins
    assert _error(model, quantized, task) < 0.9 * _error(model, rtn, task)
