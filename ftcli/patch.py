"""The one place where Hugging Face modules are swapped for ftcli's Triton kernels.

Swapping happens on module instances, not classes: each RMSNorm and gated MLP of the loaded model is
replaced by a module that holds the very same parameters (same names, so adapters stay interchangeable
with the unpatched model) and calls a kernel. What a module computes is read off the module itself:
the Gemma-style `(1 + w)` offset from the architecture table, the activation by probing it numerically,
so a module whose math is not recognised is left as it is.

Rotary embedding is not a module: attention forwards call their modeling module's global
`apply_rotary_pos_emb`. That global is replaced once per modeling module by a `RotaryDispatch`, which
calls the kernel only while the forward of an attention instance that apply_kernels marked is running
(two hooks on the instance keep count) and only on inputs the kernel takes; everywhere else, unpatched
models in the same process included, it calls the function it replaced.

LoRA projections are patched after peft added the adapters (`apply_lora_kernels`). peft's layers must stay
peft's, since its merging, adapter switching and disabling find them by type, so each projection keeps its
object and only its class becomes a subclass with the kernel forward; every state that forward does not
compute goes to peft's own.
"""

import contextvars
import inspect
import os
import sys
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from ftcli.architectures import Architecture
from ftcli_kernels.limits import KERNEL_DTYPES, mlp_tile_rows

QKV_PROJECTIONS = ("q_proj", "k_proj", "v_proj")  # one attention input, computed together by the stacked op
MLP_PROJECTIONS = ("gate_proj", "up_proj", "gate_up_proj", "down_proj")  # split or fused gate and up


class KernelRMSNorm(nn.Module):
    def __init__(self, weight: nn.Parameter, eps: float, offset: float):
        super().__init__()
        self.weight, self.eps, self.offset = weight, eps, offset

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        from ftcli_kernels.rms_norm import rms_norm

        return rms_norm(hidden, self.weight, self.eps, self.offset)


class KernelGatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), with gate and up as two projections or one fused `gate_up_proj`."""

    def __init__(self, mlp: nn.Module, activation: str):
        super().__init__()
        self.activation = activation
        for name in MLP_PROJECTIONS:
            if hasattr(mlp, name):
                setattr(self, name, getattr(mlp, name))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        from ftcli_kernels.gated_activation import gated_activation

        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(hidden).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(hidden), self.up_proj(hidden)
        return self.down_proj(gated_activation(gate, up, self.activation))


ROTARY_FUNCTION = "apply_rotary_pos_emb"
_inside_rope_attention = contextvars.ContextVar("inside_rope_attention", default=0)


class RotaryDispatch:
    """Stands in for a modeling module's `apply_rotary_pos_emb`, keeping the original for everything but
    the marked attention instances (see the module docstring); its fallback is exact, being the original."""

    def __init__(self, original):
        self.original = original

    def __call__(self, q, k, cos, sin, unsqueeze_dim=1):
        from ftcli_kernels.rope import apply_rope, unsupported

        if _inside_rope_attention.get() and unsqueeze_dim == 1 and not unsupported(q, k, cos, sin):
            return apply_rope(q, k, cos, sin)
        return self.original(q, k, cos, sin, unsqueeze_dim)


def kernels_can_run(device: torch.device) -> bool:
    """Triton compiles for GPUs; on a CPU it runs only in its (slow) interpreter, which tests turn on."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@dataclass
class KernelSwaps:
    """What the kernels took over in one model."""

    module_counts: dict[str, int] = field(default_factory=dict)  # kind of kernel -> modules it replaced or marked
    fused_loss: bool = False  # the loss goes through the fused LM head and cross-entropy kernel
    mlps_kept_on_gpu: int = 0  # LoRA MLPs that keep their tensors for backward, not recomputed (train's plan)
    mlps_hosted: int = 0  # and that keep them in CPU memory
    attention_layers_replayed: int = 0  # layers whose recompute replays attention (ftcli/attention_replay.py)
    mlps_dequantized_once: int = 0  # LoRA MLPs whose backward dequantizes their weights once (train's plan)


def apply_kernels(model: nn.Module, architecture: Architecture) -> KernelSwaps:
    """Swap every recognised RMSNorm and gated MLP for its kernel module and mark attention modules for the
    RoPE kernel, counting each; the loss is fused when the head is a plain bias-free linear layer."""
    counts = {"rms_norm": 0, "gated_mlp": 0}
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            replacement = _kernel_module(child, architecture)
            if replacement is not None:
                setattr(parent, name, replacement)
                counts["rms_norm" if isinstance(replacement, KernelRMSNorm) else "gated_mlp"] += 1
    counts["rope"] = sum(_use_rope_kernel(module) for module in model.modules())
    head = model.get_output_embeddings()
    return KernelSwaps(counts, fused_loss=isinstance(head, nn.Linear) and head.bias is None)


def _use_rope_kernel(module: nn.Module) -> bool:
    """Mark a module whose own forward calls its modeling module's `apply_rotary_pos_emb`; False for others."""
    code = getattr(inspect.unwrap(type(module).forward), "__code__", None)
    modeling = sys.modules.get(type(module).__module__)
    original = getattr(modeling, ROTARY_FUNCTION, None)
    if code is None or ROTARY_FUNCTION not in code.co_names or not callable(original):
        return False
    if not isinstance(original, RotaryDispatch):
        setattr(modeling, ROTARY_FUNCTION, RotaryDispatch(original))
    module.register_forward_pre_hook(_enter_rope_attention)
    # always_call: the count must come down when forward raises, as checkpointing's early-stopped recompute does
    module.register_forward_hook(_leave_rope_attention, always_call=True)
    return True


def _enter_rope_attention(module, args) -> None:
    _inside_rope_attention.set(_inside_rope_attention.get() + 1)


def _leave_rope_attention(module, args, output) -> None:
    _inside_rope_attention.set(_inside_rope_attention.get() - 1)


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


class KernelLoraLinear:
    """Mixed into the class of one peft LoRA linear by `apply_lora_kernels`: ftcli_kernels/lora_linear runs the state
    `_lora_parts` accepts, and every other one (adapters disabled or merged, extra arguments) peft's own forward."""

    def forward(self, x, *args, **kwargs):
        parts = None if args or kwargs else _lora_parts(self, x)
        if parts is None:
            return super().forward(x, *args, **kwargs)
        from ftcli_kernels.lora_linear import lora_linear

        return lora_linear(x, *parts)


class KernelLoraStackedLinear(KernelLoraLinear):
    """One of an attention module's q, k and v projections, which ftcli_kernels/lora_qkv computes together (see
    `StackedProjections`); falls back to the single-projection op in any state the stacked op does not take."""

    def forward(self, x, *args, **kwargs):
        output = None if args or kwargs else self._stacked_projections.output(self, x)
        return super().forward(x, *args, **kwargs) if output is None else output


class StackedProjections:
    """The q, k and v projections of one attention module. The first of them called with an input computes all
    three in one op and keeps the other two outputs until they are called with that same input, as attention
    forwards do right away; a call with another input computes afresh, so nothing stale is ever returned."""

    def __init__(self, projections: list[nn.Module]):
        self.projections = projections
        self.input = None  # a weak reference: the layer's hidden state must not outlive its use
        self.pending: dict[int, torch.Tensor] = {}

    def output(self, projection: nn.Module, x: torch.Tensor):
        if self.input is not None and self.input() is x and id(projection) in self.pending:
            output = self.pending.pop(id(projection))
            if not self.pending:
                self.input = None
            return output
        parts = [_lora_parts(p, x) for p in self.projections]
        if any(part is None for part in parts):
            return None
        from ftcli_kernels.lora_qkv import lora_projections

        outputs = lora_projections(x, parts)
        self.pending = {id(p): out for p, out in zip(self.projections, outputs) if p is not projection}
        self.input = weakref.ref(x)
        return outputs[self.projections.index(projection)]


class KernelLoraGatedMLP(KernelGatedMLP):
    """A KernelGatedMLP run as one fused op (ftcli_kernels/lora_mlp) while all its projections are in `_lora_parts` state.

    `hosted_by`, when set (ftcli/activation_checkpointing.host_mlp_activations), is the offloaded checkpoint that keeps
    what the op saves for backward outside the checkpoint, where the op keeps gate and up (not tiled): on the GPU
    (`keeping`) when `kept_on_gpu`, else in CPU memory (`hosting`). With `dequantizes_once`, a backward in several
    chunks of rows dequantizes the NF4 weights once for all of them (ftcli_kernels/lora_mlp)."""

    hosted_by = None
    kept_on_gpu = False
    dequantizes_once = False

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        parts = [_lora_parts(projection, hidden) for projection in _mlp_projections(self)]
        if any(part is None for part in parts):
            return super().forward(hidden)
        from ftcli_kernels.lora_mlp import lora_gated_mlp

        rows, inner = hidden.numel() // hidden.shape[-1], self.down_proj.in_features
        if self.hosted_by is None or mlp_tile_rows(rows, inner, hidden.element_size()):
            return lora_gated_mlp(hidden, self.activation, parts, dequantize_once=self.dequantizes_once)
        with self.hosted_by.keeping() if self.kept_on_gpu else self.hosted_by.hosting(hidden.numel()):
            return lora_gated_mlp(hidden, self.activation, parts, dequantize_once=self.dequantizes_once)


def dequantize_mlp_weights_once(model: nn.Module) -> int:
    """Have every LoRA MLP op's backward dequantize its NF4 weights once for all its chunks of rows, holding the three
    16-bit at once (KernelLoraGatedMLP.dequantizes_once); returns how many MLPs do."""
    mlps = [module for module in model.modules() if isinstance(module, KernelLoraGatedMLP)]
    for mlp in mlps:
        mlp.dequantizes_once = True
    return len(mlps)


class HostEmbedding(nn.Module):
    """An input embedding whose table waits in CPU memory (pinned, when the model is on a GPU) and is read a row per
    token by ftcli_kernels/embedding_rows: Llama-3-8B's 1 GiB off the GPU for about 0.6 ms of bus time a step. The
    table is a plain attribute, neither parameter nor buffer, so that moving the model leaves it where it is; it is
    still called `weight`, as code that reads the embedding's dtype expects."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        table = embedding.weight.detach()
        self.weight = table.to("cpu").pin_memory() if table.is_cuda else table
        self.num_embeddings, self.embedding_dim = self.weight.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        from ftcli_kernels.embedding_rows import embedding_rows

        return embedding_rows(ids, self.weight, ids.device)


def host_input_embeddings(model: nn.Module) -> bool:
    """Put the model's input embedding in CPU memory (HostEmbedding) where that frees its table: a plain, frozen
    nn.Embedding (no norm limit) whose table the output head does not share, as a tied head reads all of it every
    step; returns whether it did."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if (type(embedding) is not nn.Embedding or embedding.weight.requires_grad or embedding.max_norm is not None
            or head is not None and head.weight is embedding.weight):
        return False
    model.set_input_embeddings(HostEmbedding(embedding))
    return True


def apply_lora_kernels(model: nn.Module) -> dict[str, int]:
    """After peft added the adapters: each KernelGatedMLP whose projections all carry a plain LoRA becomes one
    fused op, each attention module's q, k and v with plain LoRA one stacked op, and every other such LoRA
    projection a LoRA linear op; returns how many of each."""
    swapped = {"lora_mlp": 0, "lora_qkv": 0, "lora_linear": 0}
    lora_classes = _peft_lora_linear_classes()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is KernelGatedMLP and all(_lora_parts(p) is not None for p in _mlp_projections(child)):
                setattr(parent, name, KernelLoraGatedMLP(child, child.activation))
                swapped["lora_mlp"] += 1
        qkv = [getattr(parent, name, None) for name in QKV_PROJECTIONS]
        if all(type(p) in lora_classes and _lora_parts(p) is not None for p in qkv):
            stacked = StackedProjections(qkv)
            for projection in qkv:
                projection.__class__ = _kernel_lora_class(type(projection), KernelLoraStackedLinear)
                projection._stacked_projections = stacked
            swapped["lora_qkv"] += 1
    fused = {id(p) for m in model.modules() if isinstance(m, KernelLoraGatedMLP) for p in _mlp_projections(m)}
    for module in model.modules():
        if type(module) in lora_classes and id(module) not in fused and _lora_parts(module) is not None:
            module.__class__ = _kernel_lora_class(type(module), KernelLoraLinear)
            swapped["lora_linear"] += 1
    return swapped


def _lora_parts(layer: nn.Module, x: torch.Tensor | None = None):
    """(weight, bias, lora_A, lora_B, scaling) of a peft LoRA linear that the LoRA kernels compute: one active
    adapter, not merged, without dropout, DoRA, LoRA bias or other variants, over a frozen nn.Linear or
    bitsandbytes 4-bit base, for input `x` when given (a float dtype, no autocast); None otherwise.

    With the adapter disabled the scaling is 0, so the base model runs through the very arithmetic of the adapted
    one: DPO's reference (the adapter off) then equals a policy whose B is zero bit for bit, and the first step's
    rewards are exactly zero rather than the rounding difference between the kernels and peft's base layer."""
    active = getattr(layer, "active_adapters", None)
    if not active or len(active) != 1 or layer.merged:
        return None
    adapter = active[0]
    if (adapter not in layer.lora_A or adapter in getattr(layer, "lora_variant", {})
            or getattr(layer, "use_dora", {}).get(adapter) or getattr(layer, "lora_bias", {}).get(adapter)
            or not isinstance(layer.lora_dropout[adapter], nn.Identity) or getattr(layer, "fan_in_fan_out", False)):
        return None
    base = layer.get_base_layer()
    if type(base) is not nn.Linear and not _dequantizable_4bit(base):
        return None
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return None
    if x is not None and (x.dtype not in KERNEL_DTYPES or torch.is_autocast_enabled(x.device.type)):
        return None
    scaling = 0.0 if layer.disable_adapters else layer.scaling[adapter]
    return _base_weight(base), base.bias, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, scaling


def _dequantizable_4bit(base: nn.Module) -> bool:
    """A bitsandbytes 4-bit linear whose weight dequantize_4bit reads (not repacked for its CPU inference path)."""
    from bitsandbytes.nn import Linear4bit

    if not isinstance(base, Linear4bit):
        return False
    quant_state = _quant_state(base)
    return quant_state is not None and not getattr(quant_state, "packing_format_for_cpu", False)


def _quant_state(base: nn.Module):
    """A bitsandbytes 4-bit linear's quant_state: its weight's, or, while FSDP has put the gathered weight (a plain
    tensor) in the weight's place (ftcli/sharding.py), the copy bitsandbytes keeps on the module for that case."""
    quant_state = getattr(base.weight, "quant_state", None)
    return quant_state if quant_state is not None else getattr(base, "quant_state", None)


def _base_weight(base: nn.Module) -> torch.Tensor:
    """The frozen weight the kernels read, which for a 4-bit base must carry its quant_state: FSDP's gathered
    weight becomes a Params4bit over the very same bytes, as bitsandbytes' own forward does."""
    weight = base.weight
    if type(base) is nn.Linear or getattr(weight, "quant_state", None) is not None:
        return weight
    from bitsandbytes.nn import Params4bit

    state = base.quant_state
    return Params4bit(weight, quant_state=state, blocksize=state.blocksize, compress_statistics=state.nested,
                      quant_type=state.quant_type, quant_storage=weight.dtype, bnb_quantized=True)


def _mlp_projections(mlp: KernelGatedMLP) -> list[nn.Module]:
    return [getattr(mlp, name) for name in MLP_PROJECTIONS if hasattr(mlp, name)]


def _peft_lora_linear_classes() -> tuple[type, ...]:
    """peft's LoRA linears over a plain and a bitsandbytes 4-bit base, the two forwards the LoRA kernels replace."""
    from peft.tuners.lora import Linear, bnb

    return tuple(cls for cls in (Linear, getattr(bnb, "Linear4bit", None)) if cls is not None)


_KERNEL_LORA_CLASSES: dict[tuple[type, type], type] = {}


def _kernel_lora_class(peft_class: type, kernel_forward: type) -> type:
    """peft's class with `kernel_forward`'s forward in front, made once per pair."""
    if (peft_class, kernel_forward) not in _KERNEL_LORA_CLASSES:
        name = f"{kernel_forward.__name__}{peft_class.__name__}"
        _KERNEL_LORA_CLASSES[peft_class, kernel_forward] = type(name, (kernel_forward, peft_class), {})
    return _KERNEL_LORA_CLASSES[peft_class, kernel_forward]
