"""Will this recipe fit this GPU? Peak memory, steps and tokens, estimated before any weight is loaded.

The estimate models what ftcli itself allocates, from the model's config.json alone:

- frozen weights: NF4 decoder projections (half a byte per weight, plus double-quantized absmax: one byte
  per block of 64 and a float32 per 256 blocks), embeddings, LM head, norms and biases in 16 bits, counted
  on the model built on the meta device;
- LoRA: float32 adapters and their float32 gradients, and the optimizer's two moments (8 bits each with
  adamw_8bit, 32 bits with adamw); adamw_8bit's step gathers the adapters and their gradients into flat copies;
- activations: what one decoder layer keeps for backward, per token, and how many layers keep it under each
  gradient-checkpointing mode (all of them without checkpointing; only the layer inputs with `true`;
  the inputs wait in CPU memory with `offload`, two layers' worth on the GPU while in flight, except the first
  `layers_kept_on_gpu` layers' inputs, which stay on the GPU as under `true`);
- the transient peak of one layer's recompute and backward (the gated MLP's backward holds gate, up and
  their gradients, and one projection's weight dequantized to 16 bits), and of the LM head, whose fused
  cross-entropy goes through the logits 256 MiB at a time. Past a length (ftcli_kernels.limits.mlp_tile_rows) the
  MLP kernel goes through the sequence in tiles: it keeps only its input, gate and up exist a tile at a time, and
  backward holds its three projections dequantized at once.

Peak memory is then the largest of three moments: the end of the forward (at the LM head), the backward
of the top layer (every saved input still there) and the backward of the bottom layer (every adapter
gradient there). Checked against `python -m ftcli.bench` on an H100 (Llama-3-8B, r=16 on all seven
projections, NF4, kernels, AdamW8bit).

With several processes (one per GPU) the estimate is per GPU, for each `train.distributed` strategy. Under ddp
each GPU holds what a single process holds, at batch_size rows, plus a fourth moment: the adapter gradients
summed across processes through one flat buffer as large as they are. Under fsdp, FSDP2 shards the decoder
layers' weights (NF4 packed or 16-bit, with their norms and biases) over the GPUs; each GPU keeps whole the
embeddings, final norm and LM head (the fused loss reads the head), the NF4 absmax, the adapters with their
gradients and optimizer states (all-reduced as under ddp) and its own activations, and while computing it holds
two layers' weights gathered whole: the one it computes and the one prefetched. `auto` picks ddp when its
per-GPU peak fits the GPU, else fsdp.

Host memory: under `offload` each offloaded layer input waits in pinned CPU memory, which PyTorch's pinned-memory
cache hands out in powers of two. When the host cannot hold them all, the first layers keep their inputs on the
GPU instead, as many as the host cannot hold (as long as the GPU has room), so neither memory alone limits the
length. `train.gradient_checkpointing: auto` picks the fastest policy whose need fits the GPU: false (nothing
recomputed), else true, else offload; without a GPU to check against, true. Where it recomputes, the room left buys
LoRA MLPs that keep their input, gate and up on the GPU from forward to backward, so that backward does not compute
them again (`mlps_kept_on_gpu`, as many as fit in 95% of the GPU, the top layer's excepted), and below them every
N-th MLP sends the same tensors to pinned CPU memory and back (`mlps_hosted_every`), N the closest spacing whose
copies the PCIe bus carries in the time of the layers' forward (`mlp_hosting_spacing`). Before the kept MLPs, auto
spends the room on what saves more time per byte: the NF4 MLP's backward dequantizing its weights once instead of in
every chunk of rows (`mlp_weights_dequantized_once`), then the top layers keeping attention's output for their
recompute (`attention_layers_replayed`, where graphed micro-batches attend without a mask: ftcli/attention_replay.py)
or kept MLPs, whichever saves more per byte at this length (`replay_saves_more_per_byte`). The longest length that
fits (`--longest`) is searched in steps of 1,024 tokens.

    python -m ftcli.plan --shape llama3-8b --seq 2048 --bs 2 --checkpointing offload
    python -m ftcli.plan --shape llama3-8b --bs 1 --lora-r 32 --longest --gpu-memory 80GiB --host-memory 128GiB
"""

import argparse
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal, NamedTuple, Optional, Union

import torch

from ftcli.data import prepare_data
from ftcli.errors import InputError, OutOfMemory
from ftcli.loader import load_config, load_tokenizer, meta_model
from ftcli.recipe import DEFAULT_TARGET_MODULES, Recipe
from ftcli.shapes import SHAPES, shape_config
from ftcli.step_graph import attention_replayable, graphed_width, is_graphed, settle_cuda_graphs
from ftcli.steps import count_steps, micro_batch_of_all
from ftcli_kernels.limits import LOGITS_CHUNK_BYTES, MLP_BACKWARD_CHUNK_BYTES, mlp_tile_rows

GIB = 2**30
CUDA_CONTEXT_BYTES = 0.5 * GIB  # the CUDA context and libraries' workspaces, outside PyTorch's allocator
ALLOCATOR_SLACK = 0.05  # memory the caching allocator holds beyond the peak it hands out (fragmentation)
DOES_NOT_FIT_EXIT_CODE = OutOfMemory.exit_code  # as a run that ran out of memory
Strategy = Literal["ddp", "fsdp"]
STRATEGIES: tuple[Strategy, ...] = ("ddp", "fsdp")
Checkpointing = Union[bool, Literal["offload"]]  # train.gradient_checkpointing once auto is resolved
LENGTH_STEP = 1024  # the longest length that fits is a multiple of this
KEPT_MLPS_MARGIN = 0.05  # MLPs kept for speed leave this share of the GPU free: never worth running out of memory
# Bytes the bus moves to the host per FLOP a layer's forward computes: on an H200, pinned copies at 48 GB/s, and the
# forward of a Llama-3-8B layer (NF4) at 580 TFLOP/s (1.86 TFLOP in 3.2 ms at 4,096 tokens). A GPU slower for its
# bus hosts more safely than this assumes.
BUS_BYTES_PER_FLOP = 48e9 / 580e12
# How far beyond the forward's time the copies may run: every second Llama-3-8B MLP hosted under offload asks ~9%
# more of the bus than two layers' forward take, and was the fastest spacing measured (4,096 and 8,192 tokens)
BUS_OVERLOAD = 1.1
# A replayed attention saves its forward, which the fused kernels run at about half the base matmuls' rate (the
# graphed 8B step's profile, docs/benchmarks.md), less what the replay costs beside it: measured on an H200 (while it
# still repeated grouped key and value heads for the kernel), replaying 32 layers of Llama-3-8B gained 3.0% at 8,192
# tokens a row and 8 layers nothing at 2,048, so the gain counts as growing with the length beyond 2,048
ATTENTION_RATE_SHARE = 0.5
REPLAY_BREAK_EVEN_LENGTH = 2048


@dataclass
class ModelShape:
    """The sizes of a decoder-only transformer that memory depends on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    linear_sizes: list[int]  # weights of each decoder linear layer: what bitsandbytes quantizes
    other_params: int  # embeddings, LM head (once when tied), norms and biases: kept in 16 bits
    layer_other_params: int  # the part of other_params inside the decoder layers (FSDP shards it with them)
    mlp_output_normed: bool = False  # a norm after the MLP keeps its output (Gemma 2 and 3): a recompute needs the MLP

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        """Sizes from the config, parameter counts from the model built on the meta device (no memory, no weights),
        so fused projections, biases and extra norms of each family count as they are."""
        model = meta_model(config)
        layers = model.get_decoder().layers
        linear_sizes = [module.weight.numel() for module in layers.modules() if isinstance(module, torch.nn.Linear)]
        other_params = sum(parameter.numel() for parameter in model.parameters()) - sum(linear_sizes)
        layer_other_params = sum(parameter.numel() for parameter in layers.parameters()) - sum(linear_sizes)
        mlp_output_normed = any(hasattr(layer, "post_feedforward_layernorm") for layer in layers)
        config = getattr(config, "text_config", None) or config  # Gemma 3 keeps the decoder's sizes there
        heads = config.num_attention_heads
        return cls(hidden=config.hidden_size, intermediate=config.intermediate_size, layers=config.num_hidden_layers,
                   heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads, vocab=config.vocab_size,
                   linear_sizes=linear_sizes, other_params=other_params, layer_other_params=layer_other_params,
                   mlp_output_normed=mlp_output_normed)

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each decoder projection, by its Llama-style name."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (self.hidden, q), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
                "o_proj": (q, self.hidden), "gate_proj": (self.hidden, self.intermediate),
                "up_proj": (self.hidden, self.intermediate), "down_proj": (self.intermediate, self.hidden)}


@dataclass
class Setup:
    """The recipe knobs memory depends on; `seq` is the longest padded micro-batch's length."""

    batch_size: int
    seq: int
    load_in_4bit: bool = True
    compute_bytes: int = 2
    kernels: bool = True
    checkpointing: Checkpointing = True
    layers_kept_on_gpu: int = 0  # offload: the first this many layers keep their inputs on the GPU
    mlps_kept_on_gpu: int = 0  # checkpointing: this many layers' MLPs keep gate, up and input, not recomputed
    mlps_hosted_every: int = 0  # and below them every this-many-th MLP keeps them in CPU memory (0: none)
    attention_layers_replayed: int = 0  # the top this-many layers keep attention's output for their recompute
    mlp_weights_dequantized_once: bool = False  # the MLP's backward holds its three weights dequantized at once
    tiled_mlp: bool = True  # the MLP kernel tiles long inputs, as its own rule decides; False: always whole
    lora_r: int = 16
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    optimizer: str = "adamw_8bit"
    processes: int = 1  # one per GPU; batch_size counts the rows of each
    shard_layers: bool = False  # fsdp: the decoder layers' weights are split over the processes

    @classmethod
    def from_recipe(cls, recipe: Recipe, seq: int, processes: int = 1, strategy: Strategy = "ddp",
                    checkpointing: Optional[Checkpointing] = None) -> "Setup":
        """`seq` is the longest example; GRPO's loss rows are its prompts, each answered num_generations times and
        as long as the prompt and max_completion_length together (its generation cache, freed before the loss,
        is smaller than the loss's activations). `checkpointing` replaces the recipe's; the recipe's auto, which
        `settled_setup` resolves against a GPU, is true here, as where there is no GPU."""
        targets = recipe.lora.target_modules
        if checkpointing is None:
            requested = recipe.train.gradient_checkpointing
            checkpointing = True if requested == "auto" else requested
        return cls(batch_size=recipe.train.batch_size * rows_per_example(recipe), seq=seq + completion_length(recipe), load_in_4bit=recipe.model.load_in_4bit,
                   compute_bytes=4 if recipe.model.dtype == "float32" else 2, kernels=recipe.model.kernels,
                   checkpointing=checkpointing, lora_r=recipe.lora.r,
                   lora_targets=list(DEFAULT_TARGET_MODULES) if targets == "all-linear" else list(targets),
                   optimizer=recipe.train.optimizer, processes=processes,
                   shard_layers=strategy == "fsdp" and processes > 1)


@dataclass
class MemoryEstimate:
    parts: dict[str, float]  # bytes of each component at the peak moment
    moment: str  # which moment of the step is the peak
    host: float = 0.0  # pinned CPU memory of the offloaded layer inputs, of all the processes together

    @property
    def peak(self) -> float:
        return sum(self.parts.values())

    @property
    def needed(self) -> float:
        """GPU memory a run needs: the peak PyTorch allocates, the allocator's slack and the CUDA context."""
        return self.peak * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT_BYTES

    def fits(self, budget: Optional[int]) -> Optional[bool]:
        """Whether the run fits a GPU of `budget` bytes; None when there is no budget to check against."""
        return None if budget is None else self.needed <= budget

    def host_fits(self, host_budget: Optional[int]) -> Optional[bool]:
        """Whether the offloaded layer inputs fit `host_budget` bytes of CPU memory; None without a budget."""
        return None if host_budget is None else self.host <= host_budget

    def fits_both(self, budget: Optional[int], host_budget: Optional[int]) -> Optional[bool]:
        """Whether the run fits the GPU and the host: False when either is known not to, None when the GPU is
        unknown."""
        gpu, host = self.fits(budget), self.host_fits(host_budget)
        return False if False in (gpu, host) else gpu

    def figures(self) -> dict:
        """The estimate in GiB, for --json."""
        return {"peak_gib": round(self.peak / GIB, 2), "needed_gib": round(self.needed / GIB, 2),
                "host_gib": round(self.host / GIB, 2), "peak_moment": self.moment,
                "parts_gib": {k: round(v / GIB, 3) for k, v in self.parts.items()}}


def estimate_memory(model: ModelShape, setup: Setup) -> MemoryEstimate:
    """Peak GPU memory of one training step, per GPU (see the module docstring for what is counted)."""
    a = setup.compute_bytes
    tokens = setup.batch_size * setup.seq
    projections = model.projections()
    if setup.load_in_4bit:
        linears = sum(nf4_packed_bytes(size) for size in model.linear_sizes)
        absmax = sum(nf4_absmax_bytes(size) for size in model.linear_sizes)
    else:
        linears, absmax = sum(model.linear_sizes) * a, 0
    layer_weights = linears + model.layer_other_params * a  # what FSDP shards
    whole_weights = absmax + (model.other_params - model.layer_other_params) * a  # what every GPU keeps whole
    shards = setup.processes if setup.shard_layers else 1
    weights = layer_weights / shards + whole_weights

    known = {name: shape for name, shape in projections.items() if name in setup.lora_targets}
    lora_params = model.layers * sum(setup.lora_r * (i + o) for i, o in known.values())
    optimizer_bytes = 2 * (1 + 4 / 256) if setup.optimizer == "adamw_8bit" else 8
    adapters = lora_params * 4
    optimizer_state = lora_params * optimizer_bytes
    gradients = lora_params * 4

    h = model.hidden
    layer_input = layer_input_bytes(model, setup)
    layer_saved, backward_extra = layer_activation_bytes(model, setup)
    layer_backward = backward_extra + dequantized_weight_bytes(model, setup)
    # kept MLPs hold their tensors from forward to backward; of hosted ones, one group is in flight at a time
    in_flight = 1 if hosted_mlp_count(model, setup) else 0
    kept_mlps = (setup.mlps_kept_on_gpu + in_flight) * kept_mlp_bytes(model, setup)
    host = setup.processes * hosted_mlp_count(model, setup) * hosted_mlp_pinned_bytes(model, setup)
    if setup.checkpointing == "offload":
        # the inputs kept on the GPU, then of the offloaded ones this layer's and the prefetched one below it;
        # under the bottom layer, only its own input is left of those kept on the GPU
        kept = setup.layers_kept_on_gpu
        kept_top = kept_forward = (kept + min(2, model.layers - kept)) * layer_input
        kept_bottom = (1 if kept else 2) * layer_input
        layer_backward += layer_saved
        host += setup.processes * (model.layers - kept) * pinned_bytes(layer_input)
    elif setup.checkpointing:  # every layer's input until its backward; the layer in backward is recomputed
        kept_top, kept_bottom, kept_forward = model.layers * layer_input, layer_input, model.layers * layer_input
        layer_backward += layer_saved
    else:  # nothing is recomputed: every layer keeps all it saved until its backward
        kept_forward = kept_top = model.layers * (layer_saved + layer_input)
        kept_bottom = layer_saved + layer_input
    if setup.checkpointing:  # kept and hosted MLPs are those of the layers below the top one: gone before the bottom's
        kept_forward, kept_top = kept_forward + kept_mlps, kept_top + kept_mlps
        # replayed layers keep attention's output from their forward until their recompute; the bottom's own is left
        # at its backward when all are replayed
        replayed = setup.attention_layers_replayed * replayed_attention_bytes(model, setup)
        kept_forward, kept_top = kept_forward + replayed, kept_top + replayed
        if setup.attention_layers_replayed >= model.layers:
            kept_bottom += replayed_attention_bytes(model, setup)
    if setup.kernels:
        head = 3 * tokens * h * a + min(LOGITS_CHUNK_BYTES, tokens * model.vocab * a) + tokens * 4
    else:
        head = 3 * tokens * h * a + tokens * model.vocab * (a + 4 + 4)  # logits, float32 copy, its gradient

    base = {"weights": weights, "lora adapters": adapters, "optimizer states": optimizer_state}
    per_layer_gradients = gradients / model.layers
    moments = {
        "forward end (LM head and loss)": base | {"saved activations": kept_forward, "LM head and loss": head},
        "backward of the top layer": base | {"lora gradients": per_layer_gradients, "saved activations": kept_top,
                                             "one layer's recompute and backward": layer_backward},
        "backward of the bottom layer": base | {"lora gradients": gradients, "saved activations": kept_bottom,
                                                "one layer's recompute and backward": layer_backward},
    }
    if shards > 1:  # the layer computed and the one prefetched, gathered whole
        gathered = {"two layers gathered whole (fsdp)": 2 * layer_weights / model.layers}
        moments = {name: parts | gathered for name, parts in moments.items()}
    if setup.processes > 1:
        moments["gradient sum across processes"] = base | {"lora gradients": gradients, "gradient sum buffer": gradients}
    if setup.optimizer == "adamw_8bit":  # its one update gathers the adapters and their gradients (ftcli/optim.py)
        moments["optimizer step"] = base | {"lora gradients": gradients, "flat copies for the 8-bit update": 2 * adapters}
    moment = max(moments, key=lambda name: sum(moments[name].values()))
    return MemoryEstimate(moments[moment], moment, host)


def dequantized_weight_bytes(model: ModelShape, setup: Setup) -> int:
    """What a layer's backward holds of its weights dequantized to 16 bits: a 4-bit projection is dequantized for its
    matmuls, the largest at a time; the tiled MLP dequantizes its three once for all tiles, as the whole one does when
    it dequantizes once. Nothing for 16-bit weights."""
    if not setup.load_in_4bit:
        return 0
    projections = model.projections()
    mlp_weights = sum(i * o for name, (i, o) in projections.items() if name in ("gate_proj", "up_proj", "down_proj"))
    all_three = mlp_tile_rows_of(model, setup) or setup.mlp_weights_dequantized_once
    return (mlp_weights if all_three else max(i * o for i, o in projections.values())) * setup.compute_bytes


def layer_input_bytes(model: ModelShape, setup: Setup) -> int:
    """One decoder layer's input, the hidden state: what checkpointing keeps of a layer, and offload copies out."""
    return setup.batch_size * setup.seq * model.hidden * setup.compute_bytes


def layer_activation_bytes(model: ModelShape, setup: Setup) -> tuple[int, int]:
    """What one decoder layer keeps for backward, and what its backward holds on top of that (besides a dequantized
    weight), at the setup's tokens: every per-token activation term of the estimate is here."""
    a, tokens = setup.compute_bytes, setup.batch_size * setup.seq
    h, inner = model.hidden, model.intermediate
    # both norms' outputs, q, k, v, the attention output and the residual between attention and MLP
    attention = 3 * h + 2 * model.heads * model.head_dim + 2 * model.kv_heads * model.head_dim
    tile_rows = mlp_tile_rows_of(model, setup)
    if tile_rows:
        # The MLP keeps its input (the norm's output, counted above) and computes gate and up again a tile at a
        # time: a tile's gate, up, activation and their gradient. Attention's backward, at another moment, holds
        # a float32 accumulator of the query gradient and the key and value gradients at the query heads' count
        # (before grouped heads sum them): at such lengths it is the larger of the two. Both come on top of the
        # gradient flowing in and out of the layer. Measured on an H200 (Llama-3-8B NF4, r=32, batch 1, offload):
        # 21.52 GiB at 131,072 tokens and 36.74 at 262,144, against 20.93 and 35.43 here.
        mlp_tile = min(tokens, tile_rows) * inner * a * 4
        attention_backward = tokens * model.heads * model.head_dim * (4 + 2 * a)
        return tokens * a * attention, tokens * a * 3 * h + max(mlp_tile, attention_backward)
    if setup.kernels:
        saved = tokens * a * (attention + 2 * inner)  # and the MLP's gate and up; its kernel recomputes the rest
    else:
        # peft and bitsandbytes modules also keep gate, up, the activation, the gated product and float32 copies
        # of the adapters' inputs
        saved = tokens * a * (attention + 4 * inner) + tokens * 4 * (4 * h + inner)
    # The MLP backward adds its recomputed activation or its gradient and the gradients of gate and up, and the
    # gradient flowing in and out of the layer
    return saved, tokens * a * (3 * inner + 3 * h)


def kept_mlp_bytes(model: ModelShape, setup: Setup) -> int:
    """What a LoRA MLP kept outside the checkpoint holds from its forward to its backward: its input, gate and up
    (activation_checkpointing.host_mlp_activations; its r-wide products are left out, as they are small)."""
    return setup.batch_size * setup.seq * setup.compute_bytes * (model.hidden + 2 * model.intermediate)


def replayed_attention_bytes(model: ModelShape, setup: Setup) -> int:
    """What a replayed attention keeps from its forward for its recompute: its output and the float32 log-sum-exp of
    each head's rows (ftcli/attention_replay.py)."""
    tokens = setup.batch_size * setup.seq
    return tokens * model.heads * (model.head_dim * setup.compute_bytes + 4)


def replay_saves_more_per_byte(model: ModelShape, setup: Setup) -> bool:
    """Whether a replayed attention saves more time per byte of GPU memory than a kept MLP, in matmul FLOPs: the
    attention forward's beyond REPLAY_BREAK_EVEN_LENGTH at ATTENTION_RATE_SHARE of the matmuls' rate, over what it
    keeps, against the gate and up matmuls a kept MLP saves, over its input, gate and up. With every N-th MLP hosted
    a kept one saves (N - 1) / N of that, as the hosted ones below it are counted from it. False where the replay saves
    nothing."""
    beyond = setup.seq - REPLAY_BREAK_EVEN_LENGTH
    if beyond <= 0:
        return False
    attention = 2 * setup.batch_size * setup.seq * beyond * model.heads * model.head_dim / ATTENTION_RATE_SHARE
    mlp = 4 * setup.batch_size * setup.seq * model.hidden * model.intermediate
    if setup.mlps_hosted_every:
        mlp *= 1 - 1 / setup.mlps_hosted_every
    return attention / replayed_attention_bytes(model, setup) > mlp / kept_mlp_bytes(model, setup)


def hosted_mlp_count(model: ModelShape, setup: Setup) -> int:
    """How many MLPs keep their tensors in CPU memory: every `mlps_hosted_every`-th of the layers below the top one
    and the kept ones (activation_checkpointing.host_mlp_activations)."""
    if not setup.mlps_hosted_every:
        return 0
    return math.ceil(max(0, model.layers - 1 - setup.mlps_kept_on_gpu) / setup.mlps_hosted_every)


def hosted_mlp_pinned_bytes(model: ModelShape, setup: Setup) -> int:
    """Pinned CPU memory of one hosted MLP's input, gate and up, each a tensor of its own."""
    feature_bytes = setup.batch_size * setup.seq * setup.compute_bytes  # one feature over all the tokens
    return pinned_bytes(feature_bytes * model.hidden) + 2 * pinned_bytes(feature_bytes * model.intermediate)


def mlp_hosting_spacing(model: ModelShape, setup: Setup) -> int:
    """The closest spacing N at which hosting every N-th MLP keeps the bus within its time: the copies of N layers
    (one MLP's input, gate and up, and under offload N layer inputs) against what the bus moves while those layers'
    forward runs (BUS_BYTES_PER_FLOP, BUS_OVERLOAD). Activation_checkpointing.host_mlp_activations says why."""
    tokens = setup.batch_size * setup.seq
    linear_flops = 2 * tokens * sum(i * o for i, o in model.projections().values())
    attention_flops = 2 * setup.batch_size * setup.seq ** 2 * model.heads * model.head_dim  # QK^T and PV, causal
    carried = BUS_OVERLOAD * BUS_BYTES_PER_FLOP * (linear_flops + attention_flops)
    inputs = layer_input_bytes(model, setup) if setup.checkpointing == "offload" else 0
    mlp = kept_mlp_bytes(model, setup)
    return next((every for every in range(1, model.layers) if mlp + every * inputs <= every * carried), model.layers)


def mlp_tile_rows_of(model: ModelShape, setup: Setup) -> int:
    """Rows of one tile of the MLP, 0 when it runs whole: the kernel's own rule (ftcli_kernels.limits), which the
    plan and the kernel share; peft's MLP (kernels off) never tiles."""
    if not setup.kernels or not setup.tiled_mlp:
        return 0
    return mlp_tile_rows(setup.batch_size * setup.seq, model.intermediate, setup.compute_bytes)


def pinned_bytes(size: int) -> int:
    """Pinned CPU memory PyTorch takes for a tensor of `size` bytes: its caching host allocator rounds each block
    up to a power of two (ATen's CachingHostAllocator), so a 2.1 GiB layer input holds 4 GiB."""
    return 1 << (size - 1).bit_length() if size > 0 else 0


def nf4_packed_bytes(weights: int) -> int:
    """Storage of one weight matrix's NF4 codes: two weights a byte."""
    return math.ceil(weights / 2)


def nf4_absmax_bytes(weights: int) -> int:
    """Storage of one NF4 weight matrix's scales with double quantization: one 8-bit absmax per block of 64
    weights, and one float32 absmax per 256 of those."""
    blocks = math.ceil(weights / 64)
    return blocks + 4 * math.ceil(blocks / 256)


def parse_size(text: str, flag: str = "--gpu-memory") -> int:
    """Bytes in a size such as 16GiB, 24GB, 80G or 16 (GiB when no unit is given), given to `flag`."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(GiB|GB|G|MiB|MB|M)?\s*", text, re.IGNORECASE)
    if not match:
        raise InputError(f"{flag} {text!r} is not a size; write it like 16GiB, 24GB or 80GiB.")
    units = {"gib": GIB, "g": GIB, "gb": 10**9, "mib": 2**20, "m": 2**20, "mb": 10**6, None: GIB}
    return int(float(match.group(1)) * units[(match.group(2) or "").lower() or None])


@dataclass
class Plan:
    recipe: Recipe
    shape: ModelShape
    setup: Setup  # of the strategy the run would use
    memory: MemoryEstimate  # its estimate, per GPU
    steps: int
    tokens: int
    budget: Optional[int]
    strategies: dict[str, MemoryEstimate] = field(default_factory=dict)  # with several GPUs: each strategy's
    strategy: Optional[Strategy] = None  # with several GPUs: the one train.distributed picks
    host_budget: Optional[int] = None  # CPU memory the offloaded layer inputs may take
    longest: Optional[Setup] = None  # with --longest: the setup of the longest rows that fit

    @property
    def fits(self) -> Optional[bool]:
        return self.memory.fits_both(self.budget, self.host_budget)

    def summary(self) -> dict:
        summary = {"status": "ok", **self.memory.figures(), "steps": self.steps, "tokens": self.tokens,
                   "seq": self.setup.seq, "batch_size": self.setup.batch_size,
                   "checkpointing": self.setup.checkpointing, "layers_kept_on_gpu": self.setup.layers_kept_on_gpu,
                   "mlps_kept_on_gpu": self.setup.mlps_kept_on_gpu,
                   "mlps_hosted_every": self.setup.mlps_hosted_every,
                   "mlps_hosted": hosted_mlp_count(self.shape, self.setup),
                   "attention_layers_replayed": self.setup.attention_layers_replayed,
                   "mlp_weights_dequantized_once": self.setup.mlp_weights_dequantized_once,
                   "gpu_memory_gib": gib_or_none(self.budget), "host_memory_gib": gib_or_none(self.host_budget),
                   "fits": self.fits}
        if self.strategies:
            summary |= {"gpus": self.setup.processes, "strategy": self.strategy,
                        "strategies": {name: memory.figures() | {"fits": memory.fits(self.budget)}
                                       for name, memory in self.strategies.items()}}
        if self.longest:
            memory = estimate_memory(self.shape, self.longest)
            summary["longest"] = {"seq": self.longest.seq, "batch_size": self.longest.batch_size,
                                  "tokens": self.longest.seq * self.longest.batch_size,
                                  "checkpointing": self.longest.checkpointing,
                                  "layers_kept_on_gpu": self.longest.layers_kept_on_gpu,
                                  "mlps_kept_on_gpu": self.longest.mlps_kept_on_gpu,
                                  "mlps_hosted": hosted_mlp_count(self.shape, self.longest),
                                  "attention_layers_replayed": self.longest.attention_layers_replayed,
                                  "mlp_weights_dequantized_once": self.longest.mlp_weights_dequantized_once,
                                  "needed_gib": round(memory.needed / GIB, 2), "host_gib": round(memory.host / GIB, 2)}
        return summary

    def report(self) -> str:
        gpus = self.setup.processes
        lines = [f"{self.recipe.model.name}: {self.shape.layers} layers, hidden {self.shape.hidden}, "
                 f"{'NF4' if self.setup.load_in_4bit else f'{8 * self.setup.compute_bytes}-bit'} weights, "
                 f"LoRA r={self.setup.lora_r} on {len(self.setup.lora_targets)} projections, batch "
                 f"{self.setup.batch_size} x {self.setup.seq} tokens{grpo_rows(self.recipe)}"
                 f"{f' per GPU on {gpus} GPUs' if gpus > 1 else ''}, checkpointing "
                 f"{str(self.setup.checkpointing).lower()}, kernels {'on' if self.setup.kernels else 'off'}.",
                 f"{self.steps} optimizer steps, {'at most' if rows_per_example(self.recipe) > 1 else 'about'} "
                 f"{self.tokens:,} tokens."]
        if self.strategies:
            lines += strategy_table(self.strategies, gpus, self.budget)
            lines.append(strategy_reason(self.recipe.train.distributed, self.strategy, self.budget))
        lines.append(checkpointing_reason(self.recipe.train.gradient_checkpointing, self.setup.checkpointing,
                                          self.budget))
        if self.setup.mlps_kept_on_gpu:
            lines.append(kept_mlps_line(self.shape, self.setup))
        if self.setup.mlps_hosted_every:
            lines.append(hosted_mlps_line(self.shape, self.setup))
        lines += room_spent_lines(self.shape, self.setup)
        under = f" per GPU under {self.strategy}" if self.strategies else ""
        lines.append(f"Peak GPU memory{under}, at the {self.memory.moment}: {self.memory.peak / GIB:.2f} GiB allocated")
        lines += [f"  {name:<36}{value / GIB:>8.2f} GiB" for name, value in self.memory.parts.items()]
        lines.append(f"Needs about {self.memory.needed / GIB:.2f} GiB of GPU memory with the CUDA context and "
                     "allocator slack.")
        if self.setup.checkpointing == "offload":
            lines.append(offload_line(self.shape, self.setup, self.memory, self.host_budget))
        if self.budget is not None:
            gpu_fits = self.memory.fits(self.budget)
            lines.append(f"It {'fits' if gpu_fits else 'does not fit'} {gpus_of(self.budget, gpus)}.")
            if not gpu_fits:
                lines.append(smaller_settings(self.recipe, self.shape, self.setup, self.budget))
        if self.memory.host_fits(self.host_budget) is False:
            lines.append("Its offloaded layer inputs do not fit the host's memory: shorten model.max_seq_length or "
                         "lower train.batch_size, or free host memory (--host-memory SIZE says how much there is).")
        if self.longest:
            lines += longest_lines(self.shape, self.longest, self.budget, self.host_budget)
        return "\n".join(lines)


def gib_or_none(size: Optional[int]) -> Optional[float]:
    return None if size is None else round(size / GIB, 2)


def gib_or_mib(size: int) -> str:
    """A size for the report: in GiB from one GiB up, else in MiB."""
    return f"{size / GIB:.2f} GiB" if size >= GIB else f"{size / 2**20:.0f} MiB"


def gpus_of(budget: int, gpus: int) -> str:
    """The GPUs a plan is checked against, in words."""
    return f"{gpus} GPUs with {budget / GIB:.1f} GiB each" if gpus > 1 else f"a GPU with {budget / GIB:.1f} GiB"


def checkpointing_reason(requested: Union[Checkpointing, str], chosen: Checkpointing, budget: Optional[int]) -> str:
    """Why the run would use `chosen` gradient checkpointing, in one sentence."""
    if requested != "auto":
        return f"train.gradient_checkpointing: {str(chosen).lower()}, as the recipe says."
    if budget is None:
        return ("train.gradient_checkpointing: auto picks true: there is no GPU memory to check against "
                "(--gpu-memory SIZE gives one).")
    gpu = f"a GPU with {budget / GIB:.1f} GiB"
    if chosen is False:
        return f"train.gradient_checkpointing: auto picks false: every layer's activations fit {gpu}, so nothing is " \
               "recomputed."
    if chosen is True:
        return (f"train.gradient_checkpointing: auto picks true: every layer's activations do not fit {gpu}, its "
                "input alone does, and each layer is recomputed from it in backward.")
    return (f"train.gradient_checkpointing: auto picks offload: not even every layer's input fits {gpu}, so they "
            "wait in CPU memory.")


def kept_mlps_line(shape: ModelShape, setup: Setup) -> str:
    """How many MLPs auto keeps on the GPU with the room left, and what each costs."""
    return (f"With the room left, the MLPs of {setup.mlps_kept_on_gpu} of {shape.layers} layers keep their input, "
            f"gate and up for backward on the GPU ({kept_mlp_bytes(shape, setup) / GIB:.2f} GiB each), so backward "
            "does not compute them again.")


def hosted_mlps_line(shape: ModelShape, setup: Setup) -> str:
    """How many MLPs auto hosts in CPU memory, how far apart, and what they take there."""
    count, each = hosted_mlp_count(shape, setup), hosted_mlp_pinned_bytes(shape, setup)
    below = " below those" if setup.mlps_kept_on_gpu else ""
    return (f"Every {ordinal(setup.mlps_hosted_every)} MLP{below} ({count} of {shape.layers} layers) sends them to "
            f"pinned CPU memory instead ({each / GIB:.2f} GiB each, {count * each / GIB:.2f} GiB in all), as far "
            "apart as the PCIe bus carries the copies during the forward, and backward brings them back.")


def room_spent_lines(shape: ModelShape, setup: Setup) -> list[str]:
    """What else auto buys with the room left: the MLP weights dequantized once, the attention layers replayed."""
    lines = []
    if setup.mlp_weights_dequantized_once:
        extra = (dequantized_weight_bytes(shape, setup)
                 - dequantized_weight_bytes(shape, replace(setup, mlp_weights_dequantized_once=False)))
        lines.append(f"With the room left, the MLPs' backward dequantizes their NF4 weights once for all its chunks of "
                     f"rows instead of once a chunk, holding the three at once ({extra / GIB:.2f} GiB more).")
    if setup.attention_layers_replayed:
        each = replayed_attention_bytes(shape, setup)
        lines.append(f"With the room left, the top {setup.attention_layers_replayed} of {shape.layers} layers keep "
                     f"attention's output for their recompute ({gib_or_mib(each)} each), which then runs no attention kernel.")
    return lines


def ordinal(number: int) -> str:
    """1st, 2nd, 3rd, 4th, ..., 11th, 12th, 13th, 21st."""
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"


def offload_line(shape: ModelShape, setup: Setup, memory: MemoryEstimate, host_budget: Optional[int]) -> str:
    """Where the offloaded layer inputs wait, how much host memory they take, and whether the host has it."""
    kept = setup.layers_kept_on_gpu
    pinned = pinned_bytes(layer_input_bytes(shape, setup))
    each = gib_or_mib(pinned)
    processes = f" in each of {setup.processes} processes" if setup.processes > 1 else ""
    hosted = hosted_mlp_count(shape, setup) * hosted_mlp_pinned_bytes(shape, setup)
    total = f", {memory.host / GIB:.2f} GiB with the hosted MLPs'" if hosted else ""
    inputs = memory.host - setup.processes * hosted
    line = (f"Offloaded layer inputs: those of {shape.layers - kept} of {shape.layers} layers wait in pinned CPU "
            f"memory, {each} each{processes} (PyTorch pins in powers of two): {inputs / GIB:.2f} GiB{total}")
    if host_budget is None:
        return line + " of host memory."
    available = f"the host's {host_budget / GIB:.1f} GiB available"
    if memory.host_fits(host_budget):
        if kept:
            return (f"{line}; {available} cannot hold all {shape.layers}, so the first {kept} layers keep their "
                    "inputs on the GPU.")
        return f"{line}, within {available}."
    gpu_room = f", even with the first {kept} layers' inputs kept on the GPU (all it has room for)" if kept else ""
    return f"{line}, more than {available}{gpu_room}."


def longest_lines(shape: ModelShape, longest: Setup, budget: int, host_budget: Optional[int],
                  batch_from: str = "train.batch_size") -> list[str]:
    """The longest rows that fit, and what they need, for the report; `batch_from` says where the batch comes from."""
    memory = estimate_memory(shape, longest)
    host = f" and {host_budget / GIB:.1f} GiB of host memory" if host_budget is not None else ""
    kept = longest.layers_kept_on_gpu
    split = f", the first {kept} of {shape.layers} layers' inputs kept on the GPU" if kept else ""
    split += f", {longest.mlps_kept_on_gpu} MLPs kept on the GPU" if longest.mlps_kept_on_gpu else ""
    hosted = hosted_mlp_count(shape, longest)
    split += f", {hosted} MLPs hosted in CPU memory" if hosted else ""
    split += f", attention of {longest.attention_layers_replayed} layers replayed" \
        if longest.attention_layers_replayed else ""
    split += ", MLP weights dequantized once" if longest.mlp_weights_dequantized_once else ""
    return [f"Longest max_seq_length that fits {gpus_of(budget, longest.processes)}{host}, in steps of "
            f"{LENGTH_STEP:,}: {longest.seq:,} tokens, at batch {longest.batch_size} ({batch_from}) "
            f"= {longest.seq * longest.batch_size:,} tokens a micro-batch.",
            f"  There: checkpointing {str(longest.checkpointing).lower()}{split}; about {memory.needed / GIB:.2f} GiB "
            f"of GPU memory and {memory.host / GIB:.2f} GiB of pinned host memory."]


def strategy_table(strategies: dict[str, MemoryEstimate], gpus: int, budget: Optional[int]) -> list[str]:
    """One row per strategy: its per-GPU weights, peak, need, and whether that fits."""
    meaning = {"ddp": "whole model on each GPU", "fsdp": f"decoder layers split over {gpus}"}
    fits = f"  fits {budget / GIB:.1f} GiB" if budget is not None else ""
    lines = ["Per GPU (GiB), by train.distributed:", f"  {'':<35}{'weights':>9}{'peak':>9}{'needs':>9}{fits}"]
    for name, memory in strategies.items():
        verdict = {None: "", True: "  yes", False: "  no"}[memory.fits(budget)]
        lines.append(f"  {f'{name} ({meaning[name]})':<35}{memory.parts['weights'] / GIB:>9.2f}"
                     f"{memory.peak / GIB:>9.2f}{memory.needed / GIB:>9.2f}{verdict}")
    return lines


def strategy_reason(requested: str, chosen: Strategy, budget: Optional[int]) -> str:
    """Why the run would use `chosen`, in one sentence."""
    if requested != "auto":
        return f"train.distributed: {chosen}, as the recipe says."
    if budget is None:
        return ("train.distributed: auto picks ddp: there is no GPU memory to check against (--gpu-memory SIZE gives "
                "one).")
    if chosen == "ddp":
        return "train.distributed: auto picks ddp: each GPU can hold the whole model."
    return f"train.distributed: auto picks fsdp: the whole model does not fit a GPU with {budget / GIB:.1f} GiB."


def pick_strategy(requested: str, ddp: MemoryEstimate, budget: Optional[int]) -> Strategy:
    """The recipe's strategy; for auto, ddp (the faster) unless its per-GPU need is known not to fit `budget`."""
    if requested != "auto":
        return requested
    return "fsdp" if ddp.fits(budget) is False else "ddp"


def choose_strategy(recipe: Recipe, config, processes: int, gpu_bytes: Optional[int], longest: int) -> Strategy:
    """How a run of `processes` processes shares the model: train.distributed, with auto resolved against GPUs of
    `gpu_bytes` (None when unknown: ddp) for a data set whose longest example has `longest` tokens. One process
    has nothing to shard: auto is ddp there."""
    if recipe.train.distributed != "auto":
        return recipe.train.distributed
    if processes == 1:
        return "ddp"
    # with gradient_checkpointing: auto, ddp is chosen if it fits with the least memory (offload); the
    # checkpointing is chosen for the strategy afterwards (settle_checkpointing)
    least = "offload" if recipe.train.gradient_checkpointing == "auto" else None
    ddp = estimate_memory(ModelShape.from_config(config), Setup.from_recipe(recipe, longest, processes, "ddp", least))
    return pick_strategy("auto", ddp, gpu_bytes)


def pick_checkpointing(shape: ModelShape, setup: Setup, requested: Union[Checkpointing, str],
                       budget: Optional[int]) -> Checkpointing:
    """The recipe's gradient checkpointing; for auto, the fastest whose need fits `budget`: false (nothing
    recomputed), else true, else offload, and true when there is no budget to check against."""
    if requested != "auto":
        return requested
    if budget is None:
        return True
    for mode in (False, True):
        if estimate_memory(shape, replace(setup, checkpointing=mode, layers_kept_on_gpu=0)).fits(budget):
            return mode
    return "offload"


def pick_layers_kept_on_gpu(shape: ModelShape, setup: Setup, budget: Optional[int], host_budget: Optional[int]) -> int:
    """Under offload, how many of the first layers keep their inputs on the GPU: none when the host holds all
    of them (or either memory is unknown); else as many as the host cannot hold, or as many as the GPU has room
    for when that is fewer."""
    if setup.checkpointing != "offload" or budget is None or host_budget is None:
        return 0
    per_layer = setup.processes * pinned_bytes(layer_input_bytes(shape, setup))
    needed = max(0, shape.layers - host_budget // per_layer)
    while needed and not estimate_memory(shape, replace(setup, layers_kept_on_gpu=needed)).fits(budget):
        needed -= 1
    return needed


def mlps_can_skip_recompute(shape: ModelShape, setup: Setup, requested: Union[Checkpointing, str],
                            budget: Optional[int]) -> bool:
    """Whether auto may have MLPs keep their tensors for backward (on the GPU or in CPU memory), so that backward
    does not compute them again: when layers are recomputed, on a GPU of known size, and the MLPs are LoRA kernels
    run whole (activation_checkpointing.host_mlp_activations). Not where the recipe chose its checkpointing, under
    fsdp, or where a norm after the MLP has the recompute go through it anyway."""
    mlp = {"gate_proj", "up_proj", "down_proj"}
    return not (requested != "auto" or not setup.checkpointing or budget is None or not setup.kernels
                or not mlp <= set(setup.lora_targets) or mlp_tile_rows_of(shape, setup) or setup.shard_layers
                or shape.mlp_output_normed)


def pick_mlps_hosted_every(shape: ModelShape, setup: Setup, requested: Union[Checkpointing, str],
                           budget: Optional[int], host_budget: Optional[int]) -> int:
    """Under auto, when layers are recomputed: every how-many-th MLP keeps its tensors for backward in CPU memory
    (0: none). The bus's spacing (`mlp_hosting_spacing`), or a wider one where the host cannot hold that many; none
    when the GPU has no room for the group in flight within KEPT_MLPS_MARGIN, or with several processes, whose GPUs
    may share one bus."""
    if not mlps_can_skip_recompute(shape, setup, requested, budget) or setup.processes > 1:
        return 0
    room = int(budget * (1 - KEPT_MLPS_MARGIN))
    for every in range(mlp_hosting_spacing(shape, setup), shape.layers):
        if estimate_memory(shape, replace(setup, mlps_hosted_every=every)).fits_both(room, host_budget):
            return every
    return 0


def pick_mlps_kept_on_gpu(shape: ModelShape, setup: Setup, requested: Union[Checkpointing, str],
                          budget: Optional[int]) -> int:
    """Under auto, when layers are recomputed (`mlps_can_skip_recompute`): how many MLPs keep their tensors for
    backward on the GPU (the largest count that still fits `budget`), at most all but the top layer, whose backward
    follows its forward at once. They are a speed-up where an estimate a few percent short would mean running out of
    memory, so they leave KEPT_MLPS_MARGIN of the GPU free."""
    if not mlps_can_skip_recompute(shape, setup, requested, budget):
        return 0
    room = int(budget * (1 - KEPT_MLPS_MARGIN))
    return most_that_fit(lambda count: estimate_memory(shape, replace(setup, mlps_kept_on_gpu=count)).fits(room),
                         shape.layers - 1)


def pick_mlp_weights_dequantized_once(shape: ModelShape, setup: Setup, requested: Union[Checkpointing, str],
                                      budget: Optional[int]) -> bool:
    """Under auto: whether the LoRA MLP kernel's backward dequantizes its NF4 weights once for all its chunks of rows
    (patch.dequantize_mlp_weights_once), where it goes in several (rows beyond MLP_BACKWARD_CHUNK_BYTES of one
    gate-wide temporary) and holding the three at once fits within KEPT_MLPS_MARGIN. Of the speed-ups bought with room
    it saves the most per byte (docs/benchmarks.md: +1.7% for 0.28 GiB at 8,192 tokens of Llama-3-8B). Not under fsdp
    or where the MLP goes in tiles, which dequantize once anyway."""
    mlp = {"gate_proj", "up_proj", "down_proj"}
    chunk_rows = MLP_BACKWARD_CHUNK_BYTES // (shape.intermediate * setup.compute_bytes)
    if (requested != "auto" or budget is None or not setup.load_in_4bit or not setup.kernels
            or not mlp <= set(setup.lora_targets) or mlp_tile_rows_of(shape, setup) or setup.shard_layers
            or setup.batch_size * setup.seq <= chunk_rows):
        return False
    room = int(budget * (1 - KEPT_MLPS_MARGIN))
    return bool(estimate_memory(shape, replace(setup, mlp_weights_dequantized_once=True)).fits(room))


def pick_attention_layers_replayed(shape: ModelShape, setup: Setup, requested: Union[Checkpointing, str],
                                   budget: Optional[int], replayable: bool) -> int:
    """Under auto, when layers are recomputed: how many of the top layers keep attention's output for their recompute
    (the most that fit within KEPT_MLPS_MARGIN), where the run's micro-batches are graphed and attend without a mask
    (`replayable`, ftcli/attention_replay.py) and the replay saves time at this length (`replay_saves_more_per_byte`'s
    model). Not under fsdp."""
    if (requested != "auto" or budget is None or not replayable or not setup.checkpointing or setup.shard_layers
            or not is_graphed(setup.batch_size, setup.seq) or setup.seq <= REPLAY_BREAK_EVEN_LENGTH):
        return 0
    room = int(budget * (1 - KEPT_MLPS_MARGIN))
    return most_that_fit(
        lambda count: estimate_memory(shape, replace(setup, attention_layers_replayed=count)).fits(room), shape.layers)


def most_that_fit(fits: Callable[[int], Optional[bool]], most: int) -> int:
    """The largest count from 0 to `most` for which `fits`, a condition true up to some count and false beyond."""
    low, high = 0, most
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


def settled_setup(shape: ModelShape, setup: Setup, requested: Union[Checkpointing, str], budget: Optional[int],
                  host_budget: Optional[int], replayable: bool = False) -> Setup:
    """`setup` with the recipe's gradient checkpointing (`requested`) resolved against a GPU of `budget` bytes:
    under offload, the layers whose inputs stay on the GPU for a host of `host_budget` bytes, and then, under auto,
    the spacing of the MLPs hosted in CPU memory, and with the room left the MLP weights dequantized once, then the
    replayed attention layers (where `replayable`: the micro-batches graphed, without a mask) and the kept MLPs,
    first whichever saves more per byte."""
    setup = replace(setup, checkpointing=pick_checkpointing(shape, setup, requested, budget), layers_kept_on_gpu=0,
                    mlps_kept_on_gpu=0, mlps_hosted_every=0, attention_layers_replayed=0,
                    mlp_weights_dequantized_once=False)
    setup = replace(setup, layers_kept_on_gpu=pick_layers_kept_on_gpu(shape, setup, budget, host_budget))
    setup = replace(setup, mlps_hosted_every=pick_mlps_hosted_every(shape, setup, requested, budget, host_budget))
    setup = replace(setup, mlp_weights_dequantized_once=pick_mlp_weights_dequantized_once(shape, setup, requested,
                                                                                          budget))

    def replayed(setup: Setup) -> Setup:
        return replace(setup, attention_layers_replayed=pick_attention_layers_replayed(shape, setup, requested, budget,
                                                                                       replayable))

    def kept(setup: Setup) -> Setup:
        return replace(setup, mlps_kept_on_gpu=pick_mlps_kept_on_gpu(shape, setup, requested, budget))

    setup = kept(replayed(setup)) if replay_saves_more_per_byte(shape, setup) else replayed(kept(setup))
    return setup if hosted_mlp_count(shape, setup) else replace(setup, mlps_hosted_every=0)  # all kept: none hosted


class CheckpointingChoice(NamedTuple):
    """How a run checkpoints its decoder layers: the mode, under offload how many of the first layers keep their
    inputs on the GPU, how many MLPs keep their tensors for backward on the GPU, every how-many-th MLP below them
    keeps them in CPU memory, how many of the top layers replay attention in their recompute, and whether the MLPs'
    backward dequantizes their weights once (`Setup`'s fields: what memory buys speed)."""

    mode: Checkpointing
    layers_on_gpu: int = 0
    mlps_kept_on_gpu: int = 0
    mlps_hosted_every: int = 0
    attention_layers_replayed: int = 0
    mlp_weights_dequantized_once: bool = False

    @classmethod
    def of(cls, setup: Setup) -> "CheckpointingChoice":
        """The choice a settled setup holds."""
        return cls(setup.checkpointing, setup.layers_kept_on_gpu, setup.mlps_kept_on_gpu, setup.mlps_hosted_every,
                   setup.attention_layers_replayed, setup.mlp_weights_dequantized_once)

    @property
    def skips_mlp_recompute(self) -> bool:
        """Whether some MLPs keep their tensors outside the checkpoint
        (activation_checkpointing.host_mlp_activations)."""
        return bool(self.mode and (self.mlps_kept_on_gpu or self.mlps_hosted_every))

    @property
    def keeps_blocks(self) -> bool:
        """Whether blocks of the layers keep tensors outside the checkpoint, MLPs or replayed attention, which
        OffloadedCheckpoint runs (activation_checkpointing.enable_checkpointing)."""
        return self.skips_mlp_recompute or bool(self.mode and self.attention_layers_replayed)


def settle_checkpointing(recipe: Recipe, config, gpu_bytes: Optional[int], host_bytes: Optional[int], longest: int,
                         processes: int = 1, strategy: Strategy = "ddp",
                         replayable: bool = False) -> CheckpointingChoice:
    """train.gradient_checkpointing with auto resolved against GPUs of `gpu_bytes` (None when there is no GPU:
    true); under offload how many of the first decoder layers keep their inputs on the GPU for a host of
    `host_bytes` shared by `processes` processes (0 when either memory is unknown, or the host holds them all); and
    under auto what the room left buys (`settled_setup`; `replayable`: graphed micro-batches attend without a mask);
    for a data set whose longest example has `longest` tokens."""
    requested = recipe.train.gradient_checkpointing
    if requested not in ("auto", "offload"):  # nothing to decide
        return CheckpointingChoice(requested)
    return CheckpointingChoice.of(settled_setup(ModelShape.from_config(config),
                                                Setup.from_recipe(recipe, longest, processes, strategy),
                                                requested, gpu_bytes, host_bytes, replayable))


def longest_setup(shape: ModelShape, setup: Setup, requested: Union[Checkpointing, str], budget: int,
                  host_budget: Optional[int]) -> Optional[Setup]:
    """The setup, settled, of the longest rows (a multiple of LENGTH_STEP, at the setup's batch size) whose need fits
    the GPU and the host; None when not even LENGTH_STEP fits.

    The need grows with the length, except where the MLP starts going in tiles, where it drops: the lengths on
    either side of that point are searched apart."""
    def at(seq: int) -> Setup:
        return settled_setup(shape, replace(setup, seq=seq), requested, budget, host_budget)

    def fits(seq: int) -> bool:
        return bool(estimate_memory(shape, at(seq)).fits_both(budget, host_budget))

    tiled_from = tiling_starts(shape, setup)
    if tiled_from is not None and fits(tiled_from):
        return at(longest_multiple(fits, tiled_from))
    if fits(LENGTH_STEP):
        return at(longest_multiple(fits, LENGTH_STEP, tiled_from))
    return None


def tiling_starts(shape: ModelShape, setup: Setup) -> Optional[int]:
    """The shortest multiple of LENGTH_STEP at which the MLP goes in tiles; None when it never does."""
    def tiled(seq: int) -> bool:
        return mlp_tile_rows_of(shape, replace(setup, seq=seq)) > 0

    if not setup.kernels or not setup.tiled_mlp:
        return None
    if tiled(LENGTH_STEP):
        return LENGTH_STEP
    return longest_multiple(lambda seq: not tiled(seq), LENGTH_STEP) + LENGTH_STEP


def longest_multiple(holds: Callable[[int], bool], start: int, stop: Optional[int] = None) -> int:
    """The largest multiple of LENGTH_STEP for which `holds`, a condition true up to some length and false beyond:
    bisection between `start`, where it holds, and `stop`, where it does not (None: found by doubling)."""
    low, high = start, stop
    while high is None:
        if holds(2 * low):
            low *= 2
        else:
            high = 2 * low
    while high - low > LENGTH_STEP:
        middle = (low + high) // (2 * LENGTH_STEP) * LENGTH_STEP
        low, high = (middle, high) if holds(middle) else (low, middle)
    return low


def local_gpu_memory() -> Optional[int]:
    """The memory of this machine's first GPU, to check a plan against; None without a GPU."""
    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def local_host_memory() -> Optional[int]:
    """The CPU memory this machine has available now (MemAvailable, Linux), which a run's pinned memory must fit;
    None where /proc/meminfo cannot tell."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    match = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) * 1024 if match else None


def plan_recipe(recipe: Recipe, budget: Optional[int] = None, gpus: int = 1, host_budget: Optional[int] = None,
                longest: bool = False) -> Plan:
    """Read the model's config and tokenize the data (no weights) to plan the run on `gpus` GPUs, one process
    each, checked against GPUs of `budget` bytes (else this machine's GPU) and a host of `host_budget`. With
    several, every strategy is estimated. With `longest`, the longest rows that fit are searched too."""
    if gpus < 1:
        raise InputError(f"--gpus {gpus} is not a number of GPUs: give how many GPUs the run will use (one process "
                         "each), 1 or more, for example --gpus 2.")
    config, architecture = load_config(recipe.model)
    tokenizer = load_tokenizer(recipe.model)
    data = prepare_data(recipe.data, tokenizer, recipe.example_length_limit(), recipe.train.seed)
    schedule = micro_batch_of_all(recipe.train, gpus)
    steps = count_steps(len(data.train), schedule)
    passes = steps * schedule.batch_size * schedule.grad_accum / len(data.train)
    per_example = rows_per_example(recipe)  # GRPO: each prompt's G rows, at their longest
    train_tokens = sum((example.row_length() + completion_length(recipe)) * per_example for example in data.train)
    tokens = round(train_tokens * passes)
    shape = ModelShape.from_config(config)
    seq = max(example.row_length() for example in data.train)
    budget = local_gpu_memory() if budget is None else budget
    requested = recipe.train.gradient_checkpointing
    replayable = replayable_on_a_gpu(recipe, config, architecture, gpus, seq)
    setups = {name: settled_setup(shape, Setup.from_recipe(recipe, seq, gpus, name), requested, budget, host_budget,
                                  replayable)
              for name in (STRATEGIES if gpus > 1 else ("ddp",))}
    strategies = {name: estimate_memory(shape, setup) for name, setup in setups.items()}
    if gpus == 1:
        plan = Plan(recipe, shape, setups["ddp"], strategies["ddp"], steps, tokens, budget, host_budget=host_budget)
    else:
        strategy = pick_strategy(recipe.train.distributed, strategies["ddp"], budget)
        plan = Plan(recipe, shape, setups[strategy], strategies[strategy], steps, tokens, budget, strategies, strategy,
                    host_budget)
    if longest:
        plan.longest = longest_or_advice(recipe, shape, plan.setup, budget, host_budget)
    return plan


def replayable_on_a_gpu(recipe: Recipe, config, architecture, gpus: int, seq: int) -> bool:
    """Whether the run's micro-batches, their longest `seq` tokens, would attend where attention can be replayed on a
    GPU (step_graph.attention_replayable): graphed, as train.cuda_graphs resolves there, and without a mask."""
    setting = "auto" if recipe.train.cuda_graphs is True else recipe.train.cuda_graphs  # true fails where auto is off
    dtype = torch.float16 if recipe.model.dtype == "float16" else torch.bfloat16
    graphed = settle_cuda_graphs(setting, recipe.train.method, torch.device("cuda"), dtype, gpus, architecture)
    width = graphed_width(recipe.train.batch_size, seq, recipe.example_length_limit())
    return width is not None and attention_replayable(config, graphed, recipe.data.packing, recipe.train.batch_size,
                                                      width)


def longest_or_advice(recipe: Recipe, shape: ModelShape, setup: Setup, budget: Optional[int],
                      host_budget: Optional[int]) -> Setup:
    """The settled setup of the longest rows that fit `budget` and `host_budget`; an error saying what would fit
    when not even LENGTH_STEP tokens do, or when there is no GPU memory to search against."""
    if budget is None:
        raise InputError("--longest searches the longest rows that fit a GPU, and this machine has none to measure: "
                         "give the GPU's memory with --gpu-memory SIZE, for example --gpu-memory 80GiB.")
    longest = longest_setup(shape, setup, recipe.train.gradient_checkpointing, budget, host_budget)
    if longest:
        return longest
    shortest = settled_setup(shape, replace(setup, seq=LENGTH_STEP), recipe.train.gradient_checkpointing, budget,
                             host_budget)
    memory = estimate_memory(shape, shortest)
    host = f" and {host_budget / GIB:.1f} GiB of host memory" if host_budget is not None else ""
    raise OutOfMemory(f"--longest: not even rows of {LENGTH_STEP:,} tokens at batch {setup.batch_size} fit "
                      f"{gpus_of(budget, setup.processes)}{host}: they need about {memory.needed / GIB:.2f} GiB of GPU "
                      f"memory and {memory.host / GIB:.2f} GiB of pinned host memory, under checkpointing "
                      f"{str(shortest.checkpointing).lower()}. {smaller_settings(recipe, shape, shortest, budget)}")


def grpo_rows(recipe: Recipe) -> str:
    """What a GRPO batch's rows are, for the report; empty for other methods."""
    if recipe.train.method != "grpo":
        return ""
    return (f" ({recipe.train.batch_size} prompts x {recipe.grpo.num_generations} completions of at most "
            f"{recipe.grpo.max_completion_length} tokens)")


def rows_per_example(recipe: Recipe) -> int:
    """Sequences the loss computes per example of a micro-batch: G completions of a GRPO prompt, else one."""
    return recipe.grpo.num_generations if recipe.train.method == "grpo" else 1


def completion_length(recipe: Recipe) -> int:
    """Tokens a GRPO loss row has beyond its prompt; 0 for methods whose examples are whole."""
    return recipe.grpo.max_completion_length if recipe.train.method == "grpo" else 0


def smaller_settings(recipe: Recipe, shape: ModelShape, setup: Setup, budget: Optional[int]) -> str:
    """Recipe changes estimated to fit `budget` (or, without one, each one's estimate), one knob at a time."""
    candidates = []
    if setup.processes > 1 and not setup.shard_layers:
        candidates.append(("--set train.distributed=fsdp", replace(setup, shard_layers=True)))
    if setup.shard_layers:
        more = 2 * setup.processes
        candidates.append((f"--gpus {more} (fsdp splits the layers over twice the GPUs)",
                           replace(setup, processes=more)))
    per_example = rows_per_example(recipe)
    batch, accum = setup.batch_size // per_example, recipe.train.grad_accum
    while batch > 1:
        batch, accum = batch // 2, accum * 2
        candidates.append((f"--set train.batch_size={batch} --set train.grad_accum={accum} (same effective batch)",
                           replace(setup, batch_size=batch * per_example)))
    if setup.checkpointing != "offload":
        candidates.append(("--set train.gradient_checkpointing=offload", replace(setup, checkpointing="offload")))
    completion = completion_length(recipe)
    prompt = setup.seq - completion  # the part of a row that halving leaves alone under GRPO
    seq = setup.seq
    while seq > 256 and (not completion or seq // 2 > prompt):
        seq //= 2
        knob = (f"--set grpo.max_completion_length={seq - prompt} (cuts longer completions)" if completion else
                f"--set model.max_seq_length={seq} (truncates longer examples)")
        candidates.append((knob, replace(setup, seq=seq)))
    if not setup.load_in_4bit:
        candidates.append(("--set model.load_in_4bit=true", replace(setup, load_in_4bit=True)))
    if not setup.kernels:
        candidates.append(("--set model.kernels=true", replace(setup, kernels=True)))
    fitting, seen_knobs = [], set()
    for text, candidate in candidates:
        needed = estimate_memory(shape, candidate).needed
        knob = text.split("=")[0]
        if (budget is None or needed <= budget) and knob not in seen_knobs:
            seen_knobs.add(knob)  # the mildest change of each knob that fits
            fitting.append(f"{text}: about {needed / GIB:.1f} GiB")
    if fitting:
        return "Estimated to fit: " + "; ".join(fitting) + "."
    smallest = replace(setup, batch_size=per_example, checkpointing="offload", load_in_4bit=True, kernels=True)
    needed = estimate_memory(shape, smallest).needed
    together = (f"--set train.batch_size=1 --set train.grad_accum={setup.batch_size // per_example * recipe.train.grad_accum} "
                "--set train.gradient_checkpointing=offload --set model.load_in_4bit=true --set model.kernels=true")
    if budget is not None and needed <= budget:
        return f"No single change is estimated to fit, but together {together} are: about {needed / GIB:.1f} GiB."
    length = "grpo.max_completion_length" if completion else "model.max_seq_length"
    return (f"Even {together} needs about {needed / GIB:.1f} GiB (lower {length} too, or use a GPU with "
            "more memory or a smaller model).")


def out_of_memory_advice(recipe: Recipe, config, gpu_bytes: Optional[int], longest: int, processes: int = 1,
                         strategy: Strategy = "ddp", checkpointing: Optional[Checkpointing] = None) -> str:
    """The message for a CUDA out-of-memory error: what was estimated, and the recipe knobs that would fit
    (`checkpointing`: what the run used, the recipe's auto resolved)."""
    shape = ModelShape.from_config(config)
    setup = Setup.from_recipe(recipe, longest, processes, strategy, checkpointing)
    needed = estimate_memory(shape, setup).needed
    where = f"this GPU's {gpu_bytes / GIB:.1f} GiB" if gpu_bytes else "the GPU's memory"
    return (f"CUDA ran out of memory: the run needs more than {where} (ftcli estimates about {needed / GIB:.1f} GiB "
            f"for batch {setup.batch_size} x {setup.seq} tokens). {smaller_settings(recipe, shape, setup, gpu_bytes)} "
            "`ftcli plan RECIPE --gpu-memory SIZE` checks a recipe before loading anything. Other processes on the "
            "GPU (nvidia-smi) take memory too.")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ftcli.plan", description="Estimated peak GPU memory of ftcli's "
                                     "training step for a benchmark shape (the setup of python -m ftcli.bench).")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--bs", type=int, default=2)
    parser.add_argument("--checkpointing", choices=["offload", "true", "false", "auto"], default="offload")
    parser.add_argument("--precision", choices=["nf4", "bf16"], default="nf4")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank, on all seven projections")
    parser.add_argument("--gpus", type=int, default=1, help="processes, one per GPU; the estimate is per GPU")
    parser.add_argument("--distributed", choices=STRATEGIES, default="ddp")
    parser.add_argument("--gpu-memory", metavar="SIZE", help="resolve auto and split the offloaded layer inputs "
                        "against a GPU of this size (default: this machine's)")
    parser.add_argument("--host-memory", metavar="SIZE", help="CPU memory the offloaded layer inputs may take "
                        "(default: none counted)")
    parser.add_argument("--longest", action="store_true", help="also the longest --seq, in steps of 1,024, that fits")
    args = parser.parse_args(argv)
    if args.gpus < 1:
        parser.error(f"--gpus {args.gpus}: give 1 or more")
    budget = parse_size(args.gpu_memory) if args.gpu_memory else local_gpu_memory()
    host_budget = parse_size(args.host_memory, "--host-memory") if args.host_memory else None
    if args.longest and budget is None:
        parser.error("--longest needs --gpu-memory SIZE on a machine without a GPU")
    shape = ModelShape.from_config(shape_config(args.shape))
    requested = {"offload": "offload", "true": True, "false": False, "auto": "auto"}[args.checkpointing]
    setup = settled_setup(shape, Setup(batch_size=args.bs, seq=args.seq, load_in_4bit=args.precision == "nf4",
                                       lora_r=args.lora_r, processes=args.gpus,
                                       shard_layers=args.distributed == "fsdp" and args.gpus > 1),
                          requested, budget, host_budget, replayable=True)  # the bench's batches are graphed, unmasked
    memory = estimate_memory(shape, setup)
    gpus = f"  {args.distributed} on {args.gpus} GPUs" if args.gpus > 1 else ""
    kept = f" ({setup.layers_kept_on_gpu} layers' inputs kept on the GPU)" if setup.layers_kept_on_gpu else ""
    kept += f" ({setup.mlps_kept_on_gpu} MLPs kept on the GPU, not recomputed)" if setup.mlps_kept_on_gpu else ""
    hosted = hosted_mlp_count(shape, setup)
    kept += f" ({hosted} MLPs hosted in CPU memory, every {ordinal(setup.mlps_hosted_every)})" if hosted else ""
    kept += " (MLP weights dequantized once)" if setup.mlp_weights_dequantized_once else ""
    replayed = setup.attention_layers_replayed
    kept += f" (attention of {replayed} layers replayed)" if replayed else ""
    print(f"{args.shape}  {args.precision}  r={args.lora_r}  seq {args.seq} x batch {args.bs}  checkpointing "
          f"{str(setup.checkpointing).lower()}{kept}{gpus}: estimated peak {memory.peak / GIB:.2f} GiB allocated"
          f"{' per GPU' if gpus else ''}, at the {memory.moment}")
    for name, value in memory.parts.items():
        print(f"  {name:<36}{value / GIB:>8.3f} GiB")
    if memory.host:
        print(f"  {'pinned host memory':<36}{memory.host / GIB:>8.3f} GiB")
    if args.longest:
        longest = longest_setup(shape, setup, requested, budget, host_budget)
        print("\n".join(longest_lines(shape, longest, budget, host_budget, "--bs")) if longest else
              f"Not even {LENGTH_STEP:,} tokens fit {gpus_of(budget, args.gpus)}.")


if __name__ == "__main__":
    main()
