import pytest
import torch
from torch import nn

from compactml.errors import CompactMLError
from compactml.task import Task, batch_size, causal_lm_loss, primary_output, split_batch


class KwargModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)

    def forward(self, input_ids, attention_mask):
        return (self.emb(input_ids) * attention_mask[..., None]).mean(1)


def test_split_batch_tuple_dict_and_plain_tensor():
    x, y = torch.zeros(2, 3), torch.tensor([0, 1])
    assert split_batch((x, y)) == (x, y)
    inputs, targets = split_batch({"input_ids": x, "labels": y})
    assert set(inputs) == {"input_ids"} and targets is y
    assert split_batch({"input_ids": x})[1] is None
    assert split_batch(x)[0] is x


def test_split_batch_rejects_long_tuples():
    with pytest.raises(CompactMLError, match="3 items"):
        split_batch((1, 2, 3))


def test_run_passes_dicts_as_keywords():
    model = KwargModel()
    ids = torch.tensor([[1, 2, 3]])
    task = Task(calib=[{"input_ids": ids, "attention_mask": torch.ones(1, 3)}], metric="embedding")
    out = task.run(model, task.example_input())
    assert out.shape == (1, 4)
    assert batch_size(task.example_input()) == 1


def test_example_input_falls_back_to_first_calib_batch_and_needs_data():
    x = torch.randn(4, 3)
    assert Task(calib=[(x, None)]).example_input() is x
    assert Task(calib=lambda: iter([(x, None)])).example_input() is x
    with pytest.raises(CompactMLError, match="example"):
        Task().example_input()


def test_missing_split_names_the_split():
    with pytest.raises(CompactMLError, match="no train data"):
        list(Task().batches("train"))


def test_unknown_metric_is_rejected():
    with pytest.raises(CompactMLError, match="unknown metric"):
        Task(metric="acc")


def test_default_losses_follow_the_metric():
    torch.manual_seed(0)
    model = nn.Linear(3, 5)
    x, y = torch.randn(8, 3), torch.randint(0, 5, (8,))
    loss = Task(metric="accuracy").batch_loss(model, (x, y))
    assert torch.allclose(loss, nn.functional.cross_entropy(model(x), y))

    logits = torch.zeros(2, 4, 7)  # uniform over 7 tokens -> loss = log 7
    labels = torch.randint(0, 7, (2, 4))
    assert torch.allclose(causal_lm_loss(logits, labels), torch.log(torch.tensor(7.0)))


def test_contrastive_loss_prefers_matching_pairs():
    model = nn.Identity()
    docs = torch.eye(4)
    task = Task(metric="embedding")
    good = task.batch_loss(model, (docs, docs))
    bad = task.batch_loss(model, (docs, docs.flip(0)))
    assert good < bad


def test_primary_output_reads_logits_and_tuples():
    t = torch.ones(2)

    class Out:
        logits = t

    assert primary_output(Out()) is t
    assert primary_output({"logits": t}) is t
    assert primary_output((t, None)) is t
    with pytest.raises(CompactMLError):
        primary_output("nope")
