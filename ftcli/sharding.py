"""FSDP2 sharding of the decoder layers (`train.distributed: fsdp`): each process keeps 1/N of every layer's frozen
base weights, and a layer is whole on a GPU only while it computes.

Each decoder layer is its own `fully_shard` unit, gathered before its forward and freed after it, gathered again
before its backward (and the recompute of checkpointing, which transformers runs on `forward`, inside FSDP's hooks).
The decoder module itself is the FSDP root that starts and finishes those gathers, holding no sharded weight: the
embedding, the final norm and the LM head stay whole on every process, because the fused loss
(ftcli/train.py `fused_token_loss`) calls the decoder and then reads the head's weight itself, outside any FSDP
forward, and because tied embeddings share that weight. The trained parameters (LoRA, and biases when
lora.bias trains them) are left out of FSDP: plain tensors on every process, their gradients summed by
ftcli.distributed.sum_gradients as under ddp, so FSDP only ever all-gathers frozen weights and reduces nothing, and
the optimizer, checkpoints and a resume onto another number of processes see the same tensors as in one process.

NF4 weights shard as their packed bytes: FSDP2 all-gathers a layer's uint8 weights and 16-bit norms together as
bytes. The gathered weight is a plain tensor without bitsandbytes' quant_state, which bitsandbytes keeps on the
Linear4bit module for this case; ftcli/patch.py reads it from there.

FSDP's gathers are collectives: every forward on one process must be matched by a forward on every other process
(the same number of decoder calls, in the same order, gradients or not), or the processes wait on each other until
the collective timeout. A process whose share of a micro-batch is empty still runs a forward.
"""

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ftcli.distributed import Processes, wait_for_all
from ftcli.errors import ModelError
from ftcli.recipe import ModelSettings


def load_device(settings: ModelSettings, device: torch.device) -> torch.device:
    """Where ftcli.loader.load_model puts a model that `shard_decoder_layers` will shard on `device`: 16-bit weights
    on the CPU, so that a model larger than one GPU loads and each layer reaches the GPU as this process's shard;
    NF4 weights on the GPU as in one process (a 70B model is about 40 GB in NF4), since bitsandbytes quantizes them
    there."""
    return device if settings.load_in_4bit else torch.device("cpu")


@contextmanager
def one_process_at_a_time(processes: Processes, loading_on: torch.device) -> Iterator[None]:
    """Processes run the block (load, prepare, shard) one after another when it loads the model into host memory:
    a 16-bit model is whole in memory until sharded (140 GB for 70B), and a machine holds one such copy, not one per
    GPU. Loading onto GPUs, they run it together.

    Process k waits for the k processes before it, runs the block, then waits for the rest: each barrier is passed
    once process k has finished, so the blocks run in rank order and every process passes the same barriers."""
    turns = processes.count if loading_on.type == "cpu" else 0
    for _ in range(min(processes.rank, turns)):
        wait_for_all()
    yield
    for _ in range(max(turns - processes.rank, 0)):
        wait_for_all()


def shard_decoder_layers(model: nn.Module, device: torch.device, processes: Processes) -> None:
    """Shard the frozen weights of each decoder layer of a LoRA-wrapped model (after
    ftcli.train.prepare_for_training) over the processes, and move what stays whole to `device`. Nothing to do in
    one process."""
    # here, not at the top: FSDP imports DTensor, 2.5 s that a run without fsdp need not wait
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not processes.several:
        return
    decoder = model.get_decoder()
    layers = _decoder_layers(decoder)
    trained = {parameter for parameter in model.parameters() if parameter.requires_grad}
    mesh = init_device_mesh(device.type, (processes.count,))
    for layer in layers:
        fully_shard(layer, mesh=mesh, ignored_params={p for p in layer.parameters() if p in trained})
    sharded = {parameter for layer in layers for parameter in layer.parameters() if parameter not in trained}
    fully_shard(decoder, mesh=mesh, ignored_params={p for p in decoder.parameters() if p not in sharded})
    _move_whole_tensors(model, device)


def _decoder_layers(decoder: nn.Module) -> nn.ModuleList:
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ModelError(f"train.distributed: fsdp shards a model's decoder layers, and this model's decoder "
                         f"({type(decoder).__name__}) keeps none in a `layers` list. Use train.distributed: ddp.")
    return layers


@torch.no_grad()
def _move_whole_tensors(model: nn.Module, device: torch.device) -> None:
    """What FSDP left where the model was loaded (the embedding, final norm and head, the trained parameters, the
    buffers outside the layers) onto `device`, keeping each parameter object, so tied weights stay tied."""
    for parameter in model.parameters():
        if parameter.device.type != device.type:
            parameter.data = parameter.data.to(device)
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.device.type != device.type:
                setattr(module, name, buffer.to(device))
