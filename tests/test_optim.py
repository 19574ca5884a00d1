"""ftcli's AdamW8bit makes exactly bitsandbytes' updates, with the large LoRA matrices in one update call a step."""

import io

import bitsandbytes
import pytest
import torch

from ftcli.errors import CheckpointError
from ftcli.optim import FLAT_STATE, build_optimizer
from ftcli.recipe import TrainSettings
from ftcli.snapshots import load_optimizer_state

# LoRA-like shapes: three of whole 256-element blocks and at least 4096 elements, stepped as one flat tensor; one of
# 4257 elements (8-bit moments, not whole blocks) and one under 4096 (32-bit moments), both stepped apart
SHAPES = [(33, 129), (16, 256), (7, 5), (512, 16), (8, 512)]
FLAT, APART = [1, 3, 4], [0, 2]
SETTINGS = TrainSettings(optimizer="adamw_8bit", learning_rate=1e-2, weight_decay=0.01)
# bitsandbytes' CPU update and its CUDA kernel are different code: the flat update must equal each one's own
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


def start_weights(device: str = "cpu") -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator).to(device) for shape in SHAPES]


def as_parameters(weights: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(weight.clone()) for weight in weights]


def bitsandbytes_adamw(parameters, lr: float = 1e-2):
    return bitsandbytes.optim.AdamW8bit(parameters, lr=lr, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8)


def take_steps(steps: range, pairs, without_gradient=()) -> None:
    """Step each (parameters, optimizer) pair with the same random gradients, drawn from the step number; the
    (step, index) pairs in `without_gradient` leave that parameter's gradient None."""
    for step in steps:
        generator = torch.Generator().manual_seed(1000 + step)
        gradients = [torch.randn(shape, generator=generator) for shape in SHAPES]
        for parameters, optimizer in pairs:
            for index, (parameter, gradient) in enumerate(zip(parameters, gradients)):
                parameter.grad = None if (step, index) in without_gradient else gradient.to(parameter.device)
            optimizer.step()


def assert_same_as_per_tensor(ours, optimizer, theirs, reference) -> None:
    """Weights, moments, block scales and step counts all bit for bit those of bitsandbytes' per-tensor steps."""
    for mine, wanted in zip(ours, theirs):
        assert torch.equal(mine, wanted)
    flat = optimizer.state_dict()[FLAT_STATE]
    assert flat["members"] == FLAT
    for key in ("state1", "state2", "absmax1", "absmax2"):
        assert torch.equal(flat[key], torch.cat([reference.state[theirs[index]][key].reshape(-1) for index in FLAT]))
    assert flat["steps"] == [reference.state[theirs[index]]["step"] for index in FLAT]
    for index in APART:
        mine, wanted = optimizer.state[ours[index]], reference.state[theirs[index]]
        assert mine.keys() == wanted.keys()
        for key, value in wanted.items():
            assert torch.equal(mine[key], value) if isinstance(value, torch.Tensor) else mine[key] == value


@pytest.mark.parametrize("device", DEVICES)
def test_five_steps_equal_bitsandbytes_per_tensor_bit_for_bit(device):
    start = start_weights(device)
    ours, theirs = as_parameters(start), as_parameters(start)
    optimizer, reference = build_optimizer(ours, SETTINGS), bitsandbytes_adamw(theirs)
    take_steps(range(5), [(ours, optimizer), (theirs, reference)])
    assert all(not torch.equal(weight, first) for weight, first in zip(ours, start))  # every tensor moved
    assert_same_as_per_tensor(ours, optimizer, theirs, reference)


def test_control_another_rate_differs_in_every_tensor():
    start = start_weights()
    ours, theirs = as_parameters(start), as_parameters(start)
    take_steps(range(5), [(ours, build_optimizer(ours, SETTINGS)), (theirs, bitsandbytes_adamw(theirs, lr=1.1e-2))])
    assert all(not torch.equal(mine, other) for mine, other in zip(ours, theirs))


def test_one_update_call_for_the_flat_matrices_and_one_per_other_tensor(monkeypatch):
    ours = as_parameters(start_weights())
    optimizer = build_optimizer(ours, SETTINGS)
    calls = {"8bit": [], "32bit": []}
    for kind, name in (("8bit", "optimizer_update_8bit_blockwise"), ("32bit", "optimizer_update_32bit")):
        original = getattr(bitsandbytes.functional, name)

        def counted(optimizer_name, gradient, parameter, *rest, kind=kind, original=original, **options):
            calls[kind].append(parameter.numel())
            return original(optimizer_name, gradient, parameter, *rest, **options)

        monkeypatch.setattr(bitsandbytes.functional, name, counted)
    take_steps(range(3), [(ours, optimizer)])
    flat_size = sum(ours[index].numel() for index in FLAT)
    assert calls["8bit"] == [flat_size, ours[0].numel()] * 3
    assert calls["32bit"] == [ours[2].numel()] * 3


@pytest.mark.parametrize("device", DEVICES)
def test_a_matrix_without_a_gradient_is_skipped_as_bitsandbytes_skips_it(device):
    start = start_weights(device)
    ours, theirs = as_parameters(start), as_parameters(start)
    optimizer, reference = build_optimizer(ours, SETTINGS), bitsandbytes_adamw(theirs)
    # after step 1 the flat matrices' step counts differ, so every later step goes matrix by matrix
    take_steps(range(5), [(ours, optimizer), (theirs, reference)], without_gradient={(1, 3), (3, 1), (3, 0)})
    assert optimizer.state_dict()[FLAT_STATE]["steps"] == [4, 4, 5]
    assert_same_as_per_tensor(ours, optimizer, theirs, reference)


def test_weights_changed_between_steps_are_the_ones_stepped():
    start = start_weights()
    ours, theirs = as_parameters(start), as_parameters(start)
    optimizer, reference = build_optimizer(ours, SETTINGS), bitsandbytes_adamw(theirs)
    take_steps(range(2), [(ours, optimizer), (theirs, reference)])
    with torch.no_grad():
        for parameters in (ours, theirs):  # a new tensor for one, new values in place for another
            parameters[1].data = torch.full(SHAPES[1], 0.5)
            parameters[4].mul_(-1.0)
    take_steps(range(2, 4), [(ours, optimizer), (theirs, reference)])
    assert_same_as_per_tensor(ours, optimizer, theirs, reference)


@pytest.mark.parametrize("device", DEVICES)
def test_state_dict_round_trip_continues_exactly(device):
    start = start_weights(device)
    whole, cut = as_parameters(start), as_parameters(start)
    uninterrupted = build_optimizer(whole, SETTINGS)
    take_steps(range(5), [(whole, uninterrupted)])

    first = build_optimizer(cut, SETTINGS)
    take_steps(range(2), [(cut, first)])
    saved = io.BytesIO()
    torch.save(first.state_dict(), saved)  # as a checkpoint stores it
    saved.seek(0)
    resumed = build_optimizer(cut, SETTINGS)
    load_optimizer_state(resumed, torch.load(saved, map_location="cpu", weights_only=True))  # as snapshots load it
    take_steps(range(2, 5), [(cut, resumed)])

    for mine, wanted in zip(cut, whole):
        assert torch.equal(mine, wanted)
    for key, value in uninterrupted.state_dict()[FLAT_STATE].items():
        got = resumed.state_dict()[FLAT_STATE][key]
        assert torch.equal(got, value) if isinstance(value, torch.Tensor) else got == value


def test_a_state_saved_matrix_by_matrix_is_refused_with_the_fix():
    start = start_weights()
    theirs = as_parameters(start)
    reference = bitsandbytes_adamw(theirs)  # what the earlier ftcli's AdamW8bit saved
    take_steps(range(1), [(theirs, reference)])
    optimizer = build_optimizer(as_parameters(start), SETTINGS)
    with pytest.raises(CheckpointError, match="earlier ftcli.*Delete the checkpoints to start the run again"):
        optimizer.load_state_dict(reference.state_dict())


def test_a_state_of_other_matrices_is_refused():
    start = start_weights()
    saved = build_optimizer(as_parameters(start[:-1]), SETTINGS).state_dict()
    with pytest.raises(CheckpointError, match="2 LoRA matrices stepped as one tensor, where this run steps 3"):
        build_optimizer(as_parameters(start), SETTINGS).load_state_dict(saved)


def test_adamw_8bit_refuses_a_closure():
    parameter = torch.nn.Parameter(torch.randn(4))
    parameter.grad = torch.randn(4)
    with pytest.raises(ValueError, match="closure"):
        build_optimizer([parameter], TrainSettings()).step(lambda: 0.0)
