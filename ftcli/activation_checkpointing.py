"""Gradient checkpointing of the decoder layers, optionally with each layer's input offloaded to CPU memory.

Plain checkpointing keeps one hidden state per layer on the GPU until backward (layers x batch x seq x
hidden: about 1 GiB for Llama-3-8B at 2 x 2048 in bf16), which dominates the activation memory of a long
sequence. With `offload`, torch's non-reentrant checkpoint still does the work (recompute with grad enabled,
the forward's RNG state restored so LoRA dropout draws the same mask again); only the inputs it saves go
through saved-tensor hooks that copy them to pinned CPU memory on a side stream while the GPU computes the
next layers. In backward, bringing a layer's input back starts the copy of the input of the layer before
it, so each transfer overlaps a layer's recompute and backward. `layers_on_gpu` keeps the inputs of the first
layers of each forward on the GPU instead, as plain checkpointing does, so that a long sequence is limited by
neither the GPU's memory nor the host's alone (ftcli/plan.py decides how many).

transformers passes a decoder layer its hidden state positionally and everything else by keyword, bound into
the function it checkpoints, so the saved inputs are the hidden state alone: the attention mask, rotary
cos/sin and position ids are shared by all layers and stay where they are.

    python -m ftcli.activation_checkpointing    # on a GPU: peak memory and step time, offload against plain recompute
"""

import argparse
import statistics
import sys
import time
import weakref
from collections import deque
from contextlib import contextmanager
from typing import Optional, Union

import torch
from torch.utils.checkpoint import checkpoint

from ftcli.patch import KernelLoraGatedMLP


def enable_checkpointing(model, mode: Union[bool, str], layers_on_gpu: int = 0, keeps_blocks: bool = False) -> None:
    """Checkpoint every decoder layer of a transformers model: plain recompute (True) or "offload", which keeps
    the inputs of the first `layers_on_gpu` layers on the GPU. With `keeps_blocks`, plain recompute goes through
    OffloadedCheckpoint as well, every layer's input kept on the GPU, so that blocks of a layer can keep their tensors
    outside the recompute: MLPs (host_mlp_activations) and replayed attention (ftcli/attention_replay.py)."""
    if not mode:
        return
    settings = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the newer name; the old one warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=settings)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=settings)
    if mode == "offload" or keeps_blocks:
        # transformers takes no checkpoint function publicly: its kwargs only reach torch's checkpoint, and its
        # own offload option copies synchronously on the compute stream. This is the method its enable calls.
        function = OffloadedCheckpoint(layers_on_gpu if mode == "offload" else sys.maxsize)
        model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=function)


def host_mlp_activations(model, every: int, on_gpu: int = 0) -> tuple[int, int]:
    """Under OffloadedCheckpoint (offload, or plain recompute with `keeps_blocks`), have LoRA MLPs save what they keep
    for backward outside the checkpoint, so that backward's recompute stops before them: counted down from the
    second layer from the top, the first `on_gpu` keep it on the GPU (`OffloadedCheckpoint.keeping`), and below them
    every `every`-th (0: none) in CPU memory (`OffloadedCheckpoint.hosting`); returns how many layers do each. The
    top layer is left out, as its backward follows its forward at once, and so are layers whose MLP output a norm
    keeps for backward (Gemma 2 and 3's post_feedforward_layernorm), whose recompute goes through the MLP anyway.

    A kept MLP costs its input, gate and up in GPU memory from forward to backward (0.25 GiB a layer of Llama-3-8B at
    4,096 tokens). A hosted one moves them over PCIe and back (5.6 ms each way at the 48 GB/s measured on an H200)
    beside the layer inputs' copies (0.7 ms each), one copy after the other, while a layer's forward takes about
    3.1 ms: hosting every second layer is a little more than the bus carries, every third a little less (ftcli/plan.py's
    mlp_hosting_spacing picks the spacing for `ftcli train`)."""
    layers = [layer for layer in offloaded_layers(model) if isinstance(getattr(layer, "mlp", None), KernelLoraGatedMLP)]
    candidates = [layer for layer in layers[-2::-1] if not hasattr(layer, "post_feedforward_layernorm")]
    kept, below = candidates[:on_gpu], candidates[on_gpu:]
    hosted = below[::every] if every else []
    for layer in kept + hosted:
        layer.mlp.hosted_by = layer._gradient_checkpointing_func
        layer.mlp.kept_on_gpu = layer in kept
    return len(kept), len(hosted)


def offloaded_layers(model) -> list:
    """The decoder layers checkpointed through OffloadedCheckpoint, bottom first: those whose blocks can keep what
    they save outside the checkpoint."""
    return [module for module in model.modules()
            if isinstance(getattr(module, "_gradient_checkpointing_func", None), OffloadedCheckpoint)]


def _as_it_is(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class _Offloaded:
    """One saved tensor (a layer's input, one of a hosted MLP's, or a replayed attention's output): its CPU copy, and a
    device tensor while a copy to or from the CPU is in flight or it waits to be unpacked."""

    __slots__ = ("device", "order", "host", "on_device", "copied", "previous", "group", "unpacked", "__weakref__")

    def __init__(self, device: torch.device, previous: Optional[weakref.ref], group: Optional[list] = None):
        self.device = device
        self.order: Optional[list[int]] = None  # the saved tensor's dimensions in memory order, where not as indexed
        self.host: Optional[torch.Tensor] = None
        self.on_device: Optional[torch.Tensor] = None
        self.copied: Optional[torch.cuda.Event] = None
        self.previous = previous  # what was saved just before this one: what backward needs next
        self.group = group  # a hosted MLP's tensors, itself among them: brought back together
        self.unpacked = False


class OffloadedCheckpoint:
    """A `_gradient_checkpointing_func` for transformers whose saved layer inputs wait in CPU memory.

    On the CPU the same steps run with plain copies (no streams, no pinning), so tests exercise them.
    """

    def __init__(self, layers_on_gpu: int = 0):
        self._streams: dict[tuple[torch.device, bool], torch.cuda.Stream] = {}  # by device, and whether for hosting
        self._in_flight: deque = deque()  # (saved, event) of copies to the CPU whose device tensor is still held
        self._in_flight_of_layer = 0  # how many of them the layer under way started
        self._hosted_in_flight: deque = deque()  # the same for hosted MLPs' tensors (see `hosting`)
        self._group: Optional[list] = None  # the hosted MLP's tensors being saved
        self._smallest = 0  # and the fewest elements of one it copies
        self._last: Optional[weakref.ref] = None
        self.layers_on_gpu = layers_on_gpu
        self._packed = 0  # layer inputs saved by the forward under way; backward's first unpack ends it
        self._copies = 0  # tensors copied to the CPU by the forward under way: the index of each one's buffer
        self._host_buffers: list[torch.Tensor] = []  # the pinned CPU copy of each offloaded tensor, kept for the next step
        self._captured: list[torch.Tensor] = []  # buffers a CUDA graph copies into: kept even when outgrown

    @property
    def forward_under_way(self) -> bool:
        """Whether a checkpointed forward is running (its layers' inputs being saved), not yet its backward with the
        recompute in it."""
        return self._packed > 0

    def __call__(self, function, *args, **kwargs):
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            return checkpoint(function, *args, use_reentrant=False, **kwargs)

    def pack(self, tensor: torch.Tensor):
        if tensor.numel() == 0:  # the placeholder some torch versions save beside the inputs
            return tensor
        self._packed += 1
        # The copies the layer before started may still queue behind a hosted MLP's longer ones on the bus: wait for
        # those started before them, which have had two layers' forward to finish
        self._release_copied(self._in_flight, keep=self._in_flight_of_layer)
        self._in_flight_of_layer = 0
        if self._packed <= self.layers_on_gpu:
            return tensor
        return self.host(tensor)

    def host(self, tensor: torch.Tensor) -> _Offloaded:
        """Start copying a tensor that the checkpointed forward keeps for backward to CPU memory, in line with the layer
        inputs: a layer's input (`pack`), or what a block of the layer keeps aside for its recompute (a replayed
        attention's output, ftcli/attention_replay.py). Backward brings it back with `unpack`, started when the
        tensor saved after it comes back."""
        saved = _Offloaded(tensor.device, self._last)
        self._copy_to_host(saved, tensor, self._in_flight)
        self._in_flight_of_layer += 1
        self._last = weakref.ref(saved)
        return saved

    @contextmanager
    def hosting(self, smallest: int):
        """Run a block of a checkpointed layer (its MLP) whose saved tensors of at least `smallest` elements (the
        block's input's: its r-wide products and cast adapters are smaller and stay) go to CPU memory as well, so
        that backward brings them back instead of recomputing them: the checkpoint's recompute stops where the
        block's saves begin, as they are not its own. Backward brings them back while the layer above goes through
        backward.

        Outside a checkpointed forward (a backward's recompute, evaluation) the block runs as it is."""
        if not self.forward_under_way:
            yield
            return
        self._release_copied(self._hosted_in_flight)  # copies started one hosted block ago: usually done
        self._group, self._smallest, previous = [], smallest, self._last
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack_hosted, self.unpack):
                yield
        finally:
            group, self._group = self._group, None
        if group:
            self._last = weakref.ref(group[-1])
        else:
            self._last = previous

    @contextmanager
    def keeping(self):
        """Run a block of a checkpointed layer (its MLP) whose saved tensors stay on the device as autograd saves them,
        outside the checkpoint, so that its recompute stops where the block's saves begin: `hosting` without the bus,
        for GPU memory. Outside a checkpointed forward the block runs as it is."""
        if not self.forward_under_way:
            yield
            return
        with torch.autograd.graph.saved_tensors_hooks(_as_it_is, _as_it_is):
            yield

    def _pack_hosted(self, tensor: torch.Tensor):
        if tensor.numel() < self._smallest:
            return tensor
        saved = _Offloaded(tensor.device, self._last, self._group)
        self._group.append(saved)
        self._copy_to_host(saved, tensor, self._hosted_in_flight)
        return saved

    def _copy_to_host(self, saved: _Offloaded, tensor: torch.Tensor, in_flight: deque) -> None:
        """Start copying `tensor` into `saved`'s CPU memory; on a GPU, on a side stream, `tensor` held until the compute
        stream has waited for the copy (`_release_copied`), so no kernel can reuse the memory it reads. A tensor laid
        out in another order than its dimensions (an attention kernel's output) is copied as it lies in memory, so that
        it comes back laid out as it left: kernels that read it may take its strides for granted (cuDNN's attention
        backward gave wrong gradients from a contiguous copy of its output)."""
        stream = self._stream(tensor.device, hosted=saved.group is not None)
        order = sorted(range(tensor.dim()), key=lambda dim: -tensor.stride(dim))
        if order != list(range(tensor.dim())) and tensor.permute(order).is_contiguous():
            saved.order, tensor = order, tensor.permute(order)
        self._copies += 1
        if stream is None:
            saved.host = tensor.detach().to("cpu", copy=True)
            return
        saved.host = self._host_buffer(self._copies - 1, tensor)
        stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(stream):
            saved.host.copy_(tensor.detach(), non_blocking=True)
            saved.copied = stream.record_event()
        saved.on_device = tensor.detach()
        in_flight.append((saved, saved.copied))

    def unpack(self, saved) -> torch.Tensor:
        if self._packed:  # backward begins: no copy of the forward may stay in flight into the next step
            self._release_copied(self._in_flight)
            self._release_copied(self._hosted_in_flight)
            self._packed = self._copies = self._in_flight_of_layer = 0
            self._last = None  # nor may the next forward's first input name one of this forward's to prefetch
        if isinstance(saved, torch.Tensor):
            return saved
        self._start_load(saved)
        if saved.copied is not None:
            torch.cuda.current_stream(saved.device).wait_event(saved.copied)
        tensor, saved.on_device, saved.copied, saved.unpacked = saved.on_device, None, None, True
        if saved.order is not None:  # back to its dimensions' order, its memory as it was
            tensor = tensor.permute([saved.order.index(dim) for dim in range(tensor.dim())])
        previous = saved.previous() if saved.previous else None
        if previous is not None:
            self._start_load(previous)  # overlaps this layer's recompute and backward
        return tensor

    def _host_buffer(self, index: int, tensor: torch.Tensor) -> torch.Tensor:
        """Pinned CPU memory for the forward's `index`-th offloaded tensor: the memory it had last step when that is
        large enough. No pinned memory is then allocated once the longest step has run, and a CUDA graph that
        captured a step (ftcli/step_graph.py) copies into memory that outlives the capture; a buffer a graph copies
        into is kept even once a longer batch outgrows it. Reuse is safe because the copies to and from it never
        overlap: each copy waits for the compute stream's earlier work, and the compute stream waits for each copy
        before it reads what was brought back or lets go of what was sent."""
        if index == len(self._host_buffers):
            self._host_buffers.append(torch.empty(0, dtype=tensor.dtype))
        flat = self._host_buffers[index]
        if flat.dtype != tensor.dtype or flat.numel() < tensor.numel():
            flat = self._host_buffers[index] = torch.empty(tensor.numel(), dtype=tensor.dtype, pin_memory=True)
        if torch.cuda.is_current_stream_capturing() and not any(flat is kept for kept in self._captured):
            self._captured.append(flat)
        return flat[:tensor.numel()].view(tensor.shape)

    def _start_load(self, saved: _Offloaded) -> None:
        """Start bringing `saved` back to the device, with the rest of its group."""
        for member in saved.group or [saved]:
            if member.on_device is not None or member.unpacked:  # still there from the forward, or already brought
                continue
            stream = self._stream(member.device, hosted=member.group is not None)
            if stream is None:
                member.on_device = member.host.to(member.device, copy=True)
                continue
            compute = torch.cuda.current_stream(member.device)
            # Allocated on the compute stream, which reads it after waiting for the copy; the copy waits for the
            # compute stream's earlier work, which may still use this memory under a previous owner
            member.on_device = torch.empty(member.host.shape, dtype=member.host.dtype, device=member.device)
            stream.wait_stream(compute)
            with torch.cuda.stream(stream):
                member.on_device.copy_(member.host, non_blocking=True)
                member.copied = stream.record_event()

    def _release_copied(self, in_flight: deque, keep: int = 0) -> None:
        """Let go of the tensors whose copies to the CPU were started, all but the latest `keep`.

        The CPU runs layers ahead of the GPU, so waiting there for a copy to finish would keep every input alive
        until a sync. Instead the compute stream waits for the copies (started a layer or two ago, so they are
        usually done), and whatever the allocator hands their memory to later is ordered after them.
        """
        while len(in_flight) > keep:
            saved, event = in_flight.popleft()
            torch.cuda.current_stream(saved.device).wait_event(event)
            if saved.copied is event:
                saved.on_device, saved.copied = None, None

    def _stream(self, device: torch.device, hosted: bool = False) -> Optional[torch.cuda.Stream]:
        """The side stream of the layer inputs' copies, or of the hosted MLPs' (apart, so that the stream order never
        holds an input's copy behind an MLP's; the bus still carries one copy after the other)."""
        if device.type != "cuda":
            return None
        if (device, hosted) not in self._streams:
            self._streams[device, hosted] = torch.cuda.Stream(device)
        return self._streams[device, hosted]


def self_check(layers: int, seq: int, batch: int, steps: int) -> None:
    """Peak memory, step time and gradient agreement of a bf16 Llama-3-8B-shaped stack with LoRA, per mode."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ftcli.architectures import ARCHITECTURES
    from ftcli.loader import add_lora
    from ftcli.recipe import LoraSettings

    if not torch.cuda.is_available():
        raise SystemExit("python -m ftcli.activation_checkpointing measures on a CUDA GPU, and this machine has none.")
    device = torch.device("cuda")
    # A small vocabulary keeps the logits small, so the layer inputs are what the modes differ in
    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=4096, attn_implementation="sdpa", use_cache=False)
    input_ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    input_ids = input_ids.to(device)
    print(f"{layers} Llama-3-8B layers, bf16, LoRA r=16, batch {batch} x seq {seq}; layer inputs "
          f"{layers * batch * seq * config.hidden_size * 2 / 2**30:.2f} GiB in all")
    print(f"{'mode':<10}{'peak GiB':>10}{'above weights':>15}{'step ms':>10}{'max |grad - plain|':>20}")
    plain_grads = None
    for mode in (True, "offload", False):  # a fresh, identical model each time
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).requires_grad_(False)
        enable_checkpointing(model, mode)
        model = add_lora(model, LoraSettings(), ARCHITECTURES["llama"], seed=0)
        model.train()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        weights = torch.cuda.memory_allocated()
        times = []
        for step in range(steps + 1):  # the first step warms up
            started = time.perf_counter()
            model(input_ids=input_ids, labels=input_ids).loss.backward()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
            if step == 0:
                grads = [p.grad.float().clone() for p in model.parameters() if p.requires_grad]
            model.zero_grad(set_to_none=True)
        peak = torch.cuda.max_memory_allocated()
        if mode is True:
            plain_grads = grads
        diff = max(float((grad - plain).abs().max()) for grad, plain in zip(grads, plain_grads))
        print(f"{str(mode).lower():<10}{peak / 2**30:>10.2f}{(peak - weights) / 2**30:>15.2f}"
              f"{statistics.median(times[1:]) * 1e3:>10.1f}{diff:>20.3g}")
        del model, grads
        torch.cuda.empty_cache()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ftcli.activation_checkpointing", description=self_check.__doc__)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--bs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="measured steps, after one warm-up step")
    args = parser.parse_args(argv)
    self_check(args.layers, args.seq, args.bs, args.steps)


if __name__ == "__main__":
    main()
