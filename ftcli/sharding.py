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

NF4 weights shard as their packed bytes, which ftcli.loader.load_model(sharded=True) stores in the compute dtype
(bitsandbytes' quant_storage): FSDP2 in torch 2.11 cannot shard a uint8 parameter. The gathered weight is a plain
tensor without bitsandbytes' quant_state, which bitsandbytes keeps on the Linear4bit module for this case;
ftcli/patch.py reads it from there, and ftcli_kernels/nf4_dequantize reads the packed weight as bytes.

FSDP's gathers are collectives: every forward on one process must be matched by a forward on every other process
(the same number of decoder calls, in the same order, with gradients or without), or the processes wait on each other
until the collective timeout. So a process whose share of a micro-batch is empty must still run a forward (and its
backward), and evaluation, reference passes and generation must run the same passes on every process.

Training code calls, in this order (see each function):

    with one_process_at_a_time(processes, recipe.model):
        model = load_model(recipe.model, architecture, device, dtype, sharded=True)
        model, kernels = prepare_for_training(model, ...)     # and load_reference_adapter, when there is one
        shard_decoder_layers(model, device, processes)
"""

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ftcli.distributed import Processes, wait_for_all
from ftcli.errors import ModelError
from ftcli.recipe import ModelSettings


@contextmanager
def one_process_at_a_time(processes: Processes, settings: ModelSettings) -> Iterator[None]:
    """Processes run the block (load, prepare, shard) one after another when it loads 16-bit weights, which stay in
    host memory until sharded (140 GB for a 70B model): a machine holds one such copy, not one per GPU. NF4 weights
    load onto the GPUs, all processes together.

    Process k waits for the k processes before it, runs the block, then waits for the rest: each barrier is passed
    once one process has finished the block, so the blocks run in rank order and every process passes the same
    barriers (each waiting at most one process's load)."""
    turns = 0 if settings.load_in_4bit else processes.count
    for _ in range(min(processes.rank, turns)):
        wait_for_all()
    yield
    for _ in range(max(turns - processes.rank, 0)):
        wait_for_all()


def shard_decoder_layers(model: nn.Module, device: torch.device, processes: Processes) -> None:
    """Shard the frozen weights of each decoder layer of a LoRA-wrapped model over the processes, and move what stays
    whole to `device`; in one process, nothing is sharded and the whole model moves to `device`.

    Called once every adapter is on the model (ftcli.train.prepare_for_training, ftcli.loader.load_reference_adapter):
    a parameter added later would belong to no FSDP unit and stay where it was loaded."""
    # here, not at the top: FSDP imports DTensor, 2.5 s that a run without fsdp need not wait
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not processes.several:
        _move_unsharded(model, device)
        return
    decoder = model.get_decoder()
    layers = _decoder_layers(decoder)
    trained = {parameter for parameter in model.parameters() if parameter.requires_grad}
    mesh = init_device_mesh(device.type, (processes.count,))
    for layer in layers:
        fully_shard(layer, mesh=mesh, ignored_params={p for p in layer.parameters() if p in trained})
    sharded = {parameter for layer in layers for parameter in layer.parameters() if parameter not in trained}
    fully_shard(decoder, mesh=mesh, ignored_params={p for p in decoder.parameters() if p not in sharded})
    _move_unsharded(model, device)


def _decoder_layers(decoder: nn.Module) -> nn.ModuleList:
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ModelError(f"train.distributed: fsdp shards a model's decoder layers, and this model's decoder "
                         f"({type(decoder).__name__}) keeps none in a `layers` list. Use train.distributed: ddp.")
    return layers


@torch.no_grad()
def _move_unsharded(model: nn.Module, device: torch.device) -> None:
    """What FSDP left where the model was loaded (the embedding, final norm and head, the trained parameters, the
    buffers outside the layers; everything in one process) onto `device`, keeping each parameter object, so tied
    weights stay tied. A tensor on the meta device has no data to move: a model built without weights (the
    benchmark's 70B one) gets its memory from `to_empty` once sharded."""
    for parameter in model.parameters():
        if parameter.device.type not in (device.type, "meta"):
            parameter.data = parameter.data.to(device)
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.device.type not in (device.type, "meta"):
                setattr(module, name, buffer.to(device))


def pass_without_rows(model: nn.Module) -> None:
    """What a process does for a micro-batch in which it has no rows (fewer rows than processes, at an epoch's end):
    nothing, unless its decoder layers are sharded; then a forward and backward of one token, multiplied by 0 so
    that no gradient changes, to gather each layer's weights together with the other processes, which would
    otherwise wait for this one."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model.get_decoder(), FSDPModule):
        return
    token = torch.zeros((1, 1), dtype=torch.long, device=model.get_input_embeddings().weight.device)
    (model(input_ids=token, use_cache=False).logits.float().sum() * 0).backward()

