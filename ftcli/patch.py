"""The one place where Hugging Face modules are swapped for ftcli's Triton kernels.

Swapping happens on module instances, not classes: each RMSNorm and gated MLP of the loaded model is
replaced by a module that holds the very same parameters (same names, so adapters stay interchangeable
with the unpatched model) and calls a kernel. What a module computes is read off the module itself:
the Gemma-style `(1 + w)` offset from the architecture table, the activation by probing it numerically,
so a module whose math is not recognised is left as it is.
"""

import os

import torch
from torch import nn

from ftcli.architectures import Architecture


class KernelRMSNorm(nn.Module):
    def __init__(self, weight: nn.Parameter, eps: float, offset: float):
        super().__init__()
        self.weight, self.eps, self.offset = weight, eps, offset

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        from kernels.rms_norm import rms_norm

        return rms_norm(hidden, self.weight, self.eps, self.offset)


class KernelGatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), with gate and up as two projections or one fused `gate_up_proj`."""

    def __init__(self, mlp: nn.Module, activation: str):
        super().__init__()
        self.activation = activation
        for name in ("gate_proj", "up_proj", "gate_up_proj", "down_proj"):
            if hasattr(mlp, name):
                setattr(self, name, getattr(mlp, name))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        from kernels.gated_activation import gated_activation

        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(hidden).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(hidden), self.up_proj(hidden)
        return self.down_proj(gated_activation(gate, up, self.activation))


def kernels_can_run(device: torch.device) -> bool:
    """Triton compiles for GPUs; on a CPU it runs only in its (slow) interpreter, which tests turn on."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def apply_kernels(model: nn.Module, architecture: Architecture) -> dict[str, int]:
    """Swap every recognised RMSNorm and gated MLP for its kernel module; returns how many of each."""
    swapped = {"rms_norm": 0, "gated_mlp": 0}
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            replacement = _kernel_module(child, architecture)
            if replacement is not None:
                setattr(parent, name, replacement)
                swapped["rms_norm" if isinstance(replacement, KernelRMSNorm) else "gated_mlp"] += 1
    return swapped


def _kernel_module(module: nn.Module, architecture: Architecture):
    kind = type(module).__name__
    if kind.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), nn.Parameter):
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if eps is not None and module.weight.dim() == 1:
            return KernelRMSNorm(module.weight, float(eps), architecture.norm_offset)
    if kind.endswith("MLP") and hasattr(module, "down_proj"):
        activation = _recognised_activation(getattr(module, "act_fn", getattr(module, "activation_fn", None)))
        fused_or_split = hasattr(module, "gate_up_proj") or (hasattr(module, "gate_proj") and hasattr(module, "up_proj"))
        if activation and fused_or_split:
            return KernelGatedMLP(module, activation)
    return None


def _recognised_activation(function) -> str:
    """"silu" or "gelu_tanh" when `function` computes it (to float32 rounding), else ""."""
    if function is None:
        return ""
    probe = torch.linspace(-8, 8, 161)
    with torch.no_grad():
        values = function(probe)
    candidates = {"silu": nn.functional.silu(probe), "gelu_tanh": nn.functional.gelu(probe, approximate="tanh")}
    return next((name for name, want in candidates.items() if torch.allclose(values, want, atol=1e-6)), "")
