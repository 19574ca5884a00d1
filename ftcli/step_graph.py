"""A micro-batch's forward and backward captured once as a CUDA graph, then replayed with one launch.

A LoRA step of a decoder is several thousand kernel launches, each behind Python: the LoRA ops, Triton's launch path,
the autograd engine and the checkpoint hooks. On a fast GPU the host takes longer to enqueue them than the GPU takes
to run them (on an H200, 407 ms against 334 ms of GPU work for Llama-3-8B at 2 x 2048 tokens, 207 against 126 ms
for the 1B shape), so the GPU waits. Replayed as a graph, the same kernels run back to back.

A graph fixes its shapes and its memory addresses, so:
- one graph per batch shape (rows x length, and which tensors the batch has): each batch is copied into that
  graph's input tensors before a replay, and the loss's scale (1 / the step's target tokens) is a device scalar.
  `ftcli train` pads rows up to a multiple of BUCKET_TOKENS, so that there are few shapes;
- backward adds into the trainable parameters' existing `.grad` tensors, so they must exist before the first
  replay and never be set to None (the optimizer zeroes them in place);
- nothing may read a value back from the GPU or allocate pinned memory during the step. The fused loss then
  computes ignored rows too (zeroed), and offloaded layer inputs go to pinned buffers kept from the warm-up;
- a batch without packing needs no mask, as its padding is on the right, which causal attention keeps every real
  token from seeing; but transformers cannot see that while a graph is captured (it would have to read the mask),
  so it builds a full one, and attention runs 2-3 times slower with it. `ftcli train` therefore gives the model no
  mask for such a batch (SupervisedMethod.collate keeps it as `padding_mask`, to count tokens), which is captured
  attending through CAUSAL_ATTENTION, which transformers gives no mask: its own SDPA attention, causal without one
  (ftcli/attention_replay.replayable_attention), unless a layer's sliding window is shorter than the rows (then the
  model's own attention, whose mask is then causal and sliding only). Packed batches keep the masks transformers
  builds from their position ids.

A micro-batch of more than GRAPHED_TOKENS runs op by op: its GPU work outlasts the host's launches anyway.

Capturing runs the micro-batch eagerly a few times on a side stream first (Triton compiles, cuBLAS picks its
algorithms, the offload buffers are allocated), then captures it into a memory pool that every graph of this object
shares. Afterwards the gradients are put back as earlier micro-batches left them, and the random state as it was
before the warm-up, so that the replays draw the dropout masks an eager run would.
"""

from contextlib import contextmanager
from typing import Callable

import torch
from transformers import AttentionInterface

from ftcli.architectures import Architecture
from ftcli.attention_replay import replayable_attention
from ftcli.errors import RecipeError

WARMUP_RUNS = 2
BUCKET_TOKENS = 256  # `ftcli train` pads a graphed micro-batch's rows up to a multiple of this: few shapes, few graphs
# A micro-batch of more tokens runs op by op. There the GPU's work outlasts the host's launches anyway (measured eager
# on an H200, Llama-3-8B's GPU time passes its host time at about 5,000 tokens, Llama-3.2-1B's at about 13,000), while
# each shape's capture costs WARMUP_RUNS + 1 passes of it: at 131,072 tokens of Llama-3-8B, 47 s each.
GRAPHED_TOKENS = 16384
CAUSAL_ATTENTION = "ftcli_causal_sdpa"  # an attention implementation that transformers gives no mask


class _Captured:
    """One batch shape's graph, the tensors its replays read, and the loss it writes."""

    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: dict[str, torch.Tensor], scale: torch.Tensor,
                 loss: torch.Tensor):
        self.graph, self.inputs, self.scale, self.loss = graph, inputs, scale, loss


class GraphedMicroBatch:
    """`summed_loss(batch)` times a scale, and its backward into the trainable parameters' gradients, replayed as a
    CUDA graph per batch shape (a batch of more than GRAPHED_TOKENS runs op by op instead). Call it as
    `graphed(batch, scale)`; it returns the scaled loss as a device scalar that lives in the graphs' shared memory,
    so the next call may overwrite it: read it before then."""

    def __init__(self, model, summed_loss: Callable[[dict[str, torch.Tensor]], torch.Tensor],
                 parameters: list[torch.nn.Parameter]):
        self.model = model
        self.summed_loss = summed_loss
        self.parameters = parameters
        self._graphs: dict[tuple, _Captured] = {}
        self._pool = None

    def __call__(self, batch: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        if not is_graphed(*batch["input_ids"].shape):
            loss = self.summed_loss(batch) * scale
            loss.backward()
            return loss.detach()
        key = tuple((name, tuple(tensor.shape), tensor.dtype) for name, tensor in sorted(batch.items()))
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._graphs[key] = self._capture(batch)
        for name, tensor in batch.items():
            captured.inputs[name].copy_(tensor, non_blocking=True)
        captured.scale.fill_(scale)
        captured.graph.replay()
        return captured.loss

    def _capture(self, batch: dict[str, torch.Tensor]) -> _Captured:
        device = next(iter(batch.values())).device
        for parameter in self.parameters:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
        grads = [parameter.grad for parameter in self.parameters]
        kept = [grad.to("cpu") for grad in grads]  # what earlier micro-batches added; on the CPU, off the peak
        inputs = {name: tensor.clone() for name, tensor in batch.items()}
        scale = torch.ones((), dtype=torch.float32, device=device)

        side = torch.cuda.Stream(device)
        graph = torch.cuda.CUDAGraph()
        random_state = torch.cuda.get_rng_state(device)
        with causal_attention(self.model, batch):
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(WARMUP_RUNS):
                    (self.summed_loss(inputs) * scale).backward()
            torch.cuda.current_stream(device).wait_stream(side)
            # The warm-up's dropout draws are none a run sees: the replays then draw what an eager run draws from
            # here, whichever step a shape is first captured at (a resumed run captures later than the whole one)
            torch.cuda.set_rng_state(random_state, device)
            with torch.cuda.graph(graph, pool=self._pool):
                loss = self.summed_loss(inputs) * scale
                loss.backward()
        self._pool = graph.pool()
        moved = [parameter for parameter, grad in zip(self.parameters, grads) if parameter.grad is not grad]
        if moved:
            raise RuntimeError(f"{len(moved)} gradients were replaced instead of added into during capture; a CUDA "
                               "graph needs them to stay where they are")
        for grad, earlier in zip(grads, kept):
            grad.copy_(earlier)
        return _Captured(graph, inputs, scale, loss.detach())


def settle_cuda_graphs(setting, method: str, device: torch.device, dtype: torch.dtype, processes: int,
                       architecture: Architecture) -> bool:
    """Whether `ftcli train` replays its micro-batches as CUDA graphs: train.cuda_graphs, auto resolved. true where
    graphs cannot run is an error that says why."""
    reasons = [reason for failed, reason in [
        (device.type != "cuda", "there is no CUDA GPU here"),
        (architecture.attention != "sdpa", f"{architecture.family} attends through transformers' "
                                           f"{architecture.attention} attention, whose mask transformers builds "
                                           "from CPU values, which a capture cannot copy"),
        (method != "sft", f"train.method is {method}, and only sft is captured (the others vary their shapes within "
                          "a step)"),
        (dtype == torch.float16, "the run computes in float16, whose loss scaling reads the gradients back each step"),
        (processes > 1, f"{processes} processes train, and graphs are captured for one"),
    ] if failed]
    if setting is True and reasons:
        raise RecipeError(f"train.cuda_graphs is true, but {reasons[0]}. Set train.cuda_graphs: auto (or false) to "
                          "train without graphs.")
    return setting is True or (setting == "auto" and not reasons)


def is_graphed(rows: int, width: int) -> bool:
    """Whether a micro-batch of `rows` rows of `width` tokens is replayed as a graph (else it runs op by op)."""
    return rows * width <= GRAPHED_TOKENS


def graphed_width(rows: int, longest: int, limit: int) -> int | None:
    """The width a micro-batch of `rows` rows, the longest `longest` tokens, is padded to for its graph: its bucket's,
    or None when a batch that wide runs op by op (padded to its longest row as without graphs)."""
    width = bucket_width(longest, limit)
    return width if is_graphed(rows, width) else None


def bucket_width(width: int, limit: int) -> int:
    """The width a graphed micro-batch's rows are padded to: `width` rounded up to a multiple of BUCKET_TOKENS, at
    most `limit` (the longest row the recipe allows)."""
    return max(width, min(limit, -(-width // BUCKET_TOKENS) * BUCKET_TOKENS))


@contextmanager
def causal_attention(model, batch: dict[str, torch.Tensor]):
    """Within it, the model attends through CAUSAL_ATTENTION, where that is exact for `batch`: it has no attention
    mask (a right-padded batch's `padding_mask` is not the model's) and no packed position ids, and no layer has a
    sliding window shorter than its rows."""
    config = model.config.get_text_config()
    previous = config._attn_implementation
    if (previous != "sdpa" or slides_within(config, batch["input_ids"].shape[-1]) or "attention_mask" in batch
            or "position_ids" in batch):
        yield
        return
    model.set_attn_implementation(CAUSAL_ATTENTION)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def slides_within(config, width: int) -> bool:
    """Whether a layer of the model attends through a sliding window shorter than rows `width` tokens wide, which the
    causal attention without a mask would not honour."""
    config = config.get_text_config()
    window = getattr(config, "sliding_window", None)
    # a config without layer kinds (Mistral, Phi-3) slides every layer's window
    kinds = getattr(config, "layer_types", None) or ["sliding_attention"]
    return window is not None and window < width and any("sliding" in kind for kind in kinds)


def attention_replayable(config, cuda_graphs: bool, packed: bool, rows: int, width: int) -> bool:
    """Whether a run's micro-batches of `rows` rows `width` tokens wide attend through CAUSAL_ATTENTION, where the
    attention of layers marked by attention_replay.replay_attention is replayed: graphed, not packed (whose rows keep
    their position ids), with no sliding window shorter than the rows (causal_attention)."""
    return cuda_graphs and not packed and is_graphed(rows, width) and not slides_within(config, width)


# transformers builds no mask for an implementation it has no mask function for, and SDPA given none is causal; the
# attention of layers marked by attention_replay.replay_attention is replayed in their recompute
AttentionInterface.register(CAUSAL_ATTENTION, replayable_attention)
