"""The training loop's arithmetic: loss normalisation over accumulated micro-batches, steps, schedules."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import randomise
from ftcli.architectures import ARCHITECTURES
from ftcli.data.templates import IGNORE_INDEX, TokenizedExample
from ftcli.optim import learning_rate_factor
from ftcli.recipe import LoraSettings, TrainSettings
from ftcli.loader import add_lora
from ftcli.steps import count_steps, data_position, examples_in_run, step_groups
from ftcli.train import accumulate_gradients, clip_gradients, collate, summed_token_loss


def tiny_lora_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = add_lora(LlamaForCausalLM(config).requires_grad_(False), LoraSettings(r=4, alpha=8),
                     ARCHITECTURES["llama"], seed)
    randomise(model, "lora_B", 0.05, seed)
    return model


def ragged_examples(seed: int = 1) -> list[TokenizedExample]:
    """Four sequences of different lengths with different numbers of target tokens."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for length, prompt in [(7, 3), (19, 4), (12, 10), (26, 5)]:
        ids = torch.randint(0, 97, (length,), generator=generator).tolist()
        examples.append(TokenizedExample(ids, [IGNORE_INDEX] * prompt + ids[prompt:], False))
    return examples


def lora_grads(model) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def test_accumulation_matches_one_big_batch():
    model = tiny_lora_llama()
    examples = ragged_examples()
    cpu = torch.device("cpu")

    big_loss, big_tokens = accumulate_gradients(model, [collate(examples, 0, cpu)])
    big = lora_grads(model)
    small_loss, small_tokens = accumulate_gradients(model, [collate([e], 0, cpu) for e in examples])
    small = lora_grads(model)

    assert small_tokens == big_tokens == sum(len(e.input_ids) for e in examples)
    assert small_loss == pytest.approx(big_loss, rel=1e-5)
    for name in big:
        assert big[name].abs().max() > 0, name
        torch.testing.assert_close(small[name], big[name], rtol=1e-4, atol=1e-7)


def test_naive_per_batch_mean_would_differ():
    """The control that makes the test above meaningful: averaging each micro-batch's mean is not the same loss."""
    model = tiny_lora_llama()
    examples = ragged_examples()
    cpu = torch.device("cpu")
    big_loss, _ = accumulate_gradients(model, [collate(examples, 0, cpu)])
    with torch.no_grad():
        naive = sum(float(summed_token_loss(model, b)) / int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
                    for b in (collate([e], 0, cpu) for e in examples)) / len(examples)
    assert abs(naive - big_loss) > 1e-3


def test_padding_does_not_change_the_loss():
    model = tiny_lora_llama()
    short, long = ragged_examples()[:2]
    cpu = torch.device("cpu")
    with torch.no_grad():
        alone = float(summed_token_loss(model, collate([short], 0, cpu)))
        padded = float(summed_token_loss(model, collate([short, long], 0, cpu))) - float(
            summed_token_loss(model, collate([long], 0, cpu)))
    assert padded == pytest.approx(alone, rel=1e-4)


@pytest.mark.parametrize("examples,max_steps,epochs,expected", [
    (100, 60, None, 60),      # 100 examples / (2 x 4) = 13 steps per epoch; max_steps alone
    (100, None, 1, 13),       # one epoch
    (100, None, 2.5, 33),     # fractional epochs round up
    (100, 20, 1, 13),         # both set: whichever ends first
    (100, 5, 3, 5),
    (3, None, 1, 1),          # fewer examples than one step
])
def test_count_steps(examples, max_steps, epochs, expected):
    settings = TrainSettings(batch_size=2, grad_accum=4, max_steps=max_steps, epochs=epochs)
    assert count_steps(examples, settings) == expected


def test_each_epoch_visits_every_example_once_in_a_new_order():
    examples = [TokenizedExample([i], [i], False) for i in range(10)]
    settings = TrainSettings(batch_size=3, grad_accum=2, max_steps=4, seed=5)
    groups = list(step_groups(examples, settings, total_steps=4))
    assert [len(group) for group in groups] == [2, 2, 2, 2]  # 4 micro-batches per epoch: 3+3+3+1
    epochs = [[e.input_ids[0] for group in groups[i:i + 2] for batch in group for e in batch] for i in (0, 2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(10))
    assert epochs[0] != epochs[1]


def test_examples_in_run_are_the_ones_its_steps_meet_each_once():
    examples = [TokenizedExample([i], [i], False) for i in range(10)]
    short = TrainSettings(batch_size=3, grad_accum=1, max_steps=2, seed=5)  # 6 of the 10 in the first epoch
    met = [e for group in step_groups(examples, short, total_steps=2) for batch in group for e in batch]
    assert examples_in_run(examples, short, total_steps=2) == met and len(met) == 6
    long = TrainSettings(batch_size=3, grad_accum=1, max_steps=7, seed=5)  # into the second epoch
    assert sorted(e.input_ids[0] for e in examples_in_run(examples, long, total_steps=7)) == list(range(10))


@pytest.mark.parametrize("kind,step,expected", [
    ("constant", 0, 1 / 3), ("constant", 1, 2 / 3), ("constant", 2, 1.0), ("constant", 9, 1.0),
    ("linear", 2, 1.0), ("linear", 6, 0.5), ("linear", 10, 0.0),
    ("cosine", 2, 1.0), ("cosine", 6, 0.5), ("cosine", 4, 0.5 * (1 + math.cos(math.pi / 4))), ("cosine", 10, 0.0),
])
def test_learning_rate_schedules(kind, step, expected):
    assert learning_rate_factor(step, warmup_steps=2, total_steps=10, kind=kind) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("limit", [0.5, None])
def test_clipping_reports_the_norm_before_and_applies_the_limit(limit):
    weight = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    weight.grad = torch.tensor([3.0, 4.0])  # norm 5
    optimizer = torch.optim.SGD([weight], lr=1.0)
    assert clip_gradients([weight], optimizer, limit, scaler=None) == pytest.approx(5.0)
    expected = torch.tensor([0.3, 0.4]) if limit else torch.tensor([3.0, 4.0])
    torch.testing.assert_close(weight.grad, expected)


@pytest.mark.parametrize("examples,batch_size,grad_accum", [(10, 3, 2), (12, 2, 2), (7, 1, 3), (5, 4, 1)])
def test_data_position_is_where_step_groups_starts_the_next_step(examples, batch_size, grad_accum):
    """A checkpoint's recorded position (epoch, first micro-batch) against the order step_groups really walks."""
    dataset = [TokenizedExample([i], [i], False) for i in range(examples)]
    settings = TrainSettings(batch_size=batch_size, grad_accum=grad_accum, max_steps=12, seed=3)
    epoch, batch_index, seen = 0, 0, 0
    for step, group in enumerate(step_groups(dataset, settings, total_steps=12), start=1):
        batch_index += len(group)
        seen += sum(len(batch) for batch in group)
        if seen == examples:  # the epoch is complete: the next step starts a new one
            epoch, batch_index, seen = epoch + 1, 0, 0
        assert data_position(step, examples, settings) == {"epoch": epoch, "batch_index": batch_index}, step
