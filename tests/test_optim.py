"""ftcli's AdamW8bit makes exactly bitsandbytes' updates, without its per-parameter device waits."""

import bitsandbytes
import pytest
import torch

from ftcli.optim import build_optimizer
from ftcli.recipe import TrainSettings


def test_adamw_8bit_updates_equal_bitsandbytes():
    generator = torch.Generator().manual_seed(0)
    shapes = [(16, 640), (640, 16), (7, 5)]  # 8-bit states from 4096 elements on, 32-bit below
    start = [torch.randn(shape, generator=generator) for shape in shapes]
    ours = [torch.nn.Parameter(t.clone()) for t in start]
    theirs = [torch.nn.Parameter(t.clone()) for t in start]
    settings = TrainSettings(optimizer="adamw_8bit", learning_rate=1e-2, weight_decay=0.01)
    optimizers = [build_optimizer(ours, settings),
                  bitsandbytes.optim.AdamW8bit(theirs, lr=1e-2, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8)]
    for _ in range(3):
        grads = [torch.randn(shape, generator=generator) for shape in shapes]
        for parameters, optimizer in zip((ours, theirs), optimizers):
            for parameter, grad in zip(parameters, grads):
                parameter.grad = grad.clone()
            optimizer.step()
    for a, b, s in zip(ours, theirs, start):
        assert not torch.equal(a, s)  # it really moved
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_adamw_8bit_refuses_a_closure():
    parameter = torch.nn.Parameter(torch.randn(4))
    parameter.grad = torch.randn(4)
    with pytest.raises(ValueError, match="closure"):
        build_optimizer([parameter], TrainSettings()).step(lambda: 0.0)
