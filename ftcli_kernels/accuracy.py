"""How a kernel's result is held to its reference, by the CPU tests and the GPU benchmark alike."""

import torch


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest absolute difference over the reference's largest magnitude, computed in the wider of the two
    dtypes (float32 at least): one number per tensor that a tolerance bounds whatever the tensor's scale."""
    compute = torch.promote_types(torch.promote_types(got.dtype, want.dtype), torch.float32)
    got, want = got.detach().to(compute), want.detach().to(compute)
    return float((got - want).abs().max() / want.abs().max())
