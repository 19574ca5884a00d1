"""FSDP2 sharding of the decoder layers, on the CPU with gloo: two processes, each computing its share of a batch on
the sharded model, give the loss and the LoRA gradients of one process computing the whole batch on the whole model,
with every checkpointing mode, with the kernels and with NF4 weights; each process holds half of each layer's
frozen weights, whole only while that layer computes; the adapter saves and loads back as checkpoints need, and
DPO's reference adapter shards with the base weights.

The processes are spawned as torchrun would start them (the same environment variables) and join ftcli's own
process group; all cases of a test run in one pair of processes, since each process spends seconds on imports."""

import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import pytest
import torch
import torch.multiprocessing
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn
from torch.distributed.tensor import DTensor

from conftest import make_output_folder, randomise
from ftcli.architectures import ARCHITECTURES
from ftcli.data.templates import IGNORE_INDEX, TokenizedExample
from ftcli.distributed import (Processes, global_sums, share, start_processes, stop_processes, sum_gradients,
                               wait_for_all)
from ftcli.errors import ModelError
from ftcli.loader import (ADAPTER_WEIGHTS, REFERENCE_ADAPTER, TRAINED_ADAPTER, load_model, load_reference_adapter,
                          reference_policy)
from ftcli.patch import _lora_parts
from ftcli.plan import CheckpointingChoice
from ftcli.recipe import LoraSettings, ModelSettings
from ftcli.sharding import one_process_at_a_time, shard_decoder_layers
from ftcli.train import collate, prepare_for_training, summed_token_loss, target_tokens

PROCESSES = 2
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Case:
    """A tiny model (`folder`, of `family`) trained one way."""

    folder: Path
    family: str = "llama"
    checkpointing: object = False
    kernels: bool = False
    load_in_4bit: bool = False

    def settings(self) -> ModelSettings:
        return ModelSettings(name=str(self.folder), load_in_4bit=self.load_in_4bit, dtype="float32")


def rows() -> list[TokenizedExample]:
    """Four rows of different lengths (so the shares pad differently), each with a masked prompt."""
    generator = torch.Generator().manual_seed(4)
    return [TokenizedExample(ids, [IGNORE_INDEX] * 3 + ids[3:], False)
            for ids in (torch.randint(3, 300, (n,), generator=generator).tolist() for n in (9, 30, 17, 24))]


def build(case: Case, processes: Processes, reference: Optional[Path] = None):
    """The tiny model with LoRA as training prepares it (B randomised, so A gets gradients), and the `reference`
    adapter of DPO when given, then sharded; in one process sharding does nothing."""
    settings, architecture = case.settings(), ARCHITECTURES[case.family]
    with one_process_at_a_time(processes, settings):
        model = load_model(settings, architecture, CPU, torch.float32, sharded=processes.several)
        model, swaps = prepare_for_training(model, architecture, LoraSettings(r=4, alpha=8), case.kernels,
                                            CheckpointingChoice(case.checkpointing), seed=3)
        randomise(model, "lora_B", 0.05, seed=2)
        if reference:
            load_reference_adapter(model, reference)
        shard_decoder_layers(model, CPU, processes)
    return model.train(), swaps


def loss_and_grads(model, examples: list[TokenizedExample], all_targets: int, fused: bool):
    """This process's summed token loss over all processes' targets, backward done; and the trained gradients."""
    loss = summed_token_loss(model, collate(examples, 0, CPU), fused) / all_targets
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def frozen_layer_weights(layer: nn.Module) -> list[torch.Tensor]:
    return [parameter for parameter in layer.parameters() if not parameter.requires_grad]


def whole(weight: torch.Tensor) -> bool:
    return not isinstance(weight, DTensor)


def count_whole_layers(layers: nn.ModuleList) -> list[int]:
    """At each layer's forward, after FSDP's gather, how many layers hold their frozen weights whole."""
    counts = []
    for layer in layers:
        layer.register_forward_pre_hook(
            lambda module, args: counts.append(sum(any(map(whole, frozen_layer_weights(other))) for other in layers)))
    return counts


def count_base_layer_calls(model) -> list[int]:
    """Calls of the LoRA projections' base layers, which the LoRA kernels never make (they read the weight)."""
    calls = []
    for module in model.modules():
        if hasattr(module, "lora_A"):
            module.get_base_layer().register_forward_hook(lambda *_: calls.append(1))
    return calls


def sharded_case(case: Case, processes: Processes) -> dict:
    """One training micro-batch on the sharded model, seen from this process."""
    model, _ = build(case, processes)
    layers = model.get_decoder().layers
    whole_layers, base_calls = count_whole_layers(layers), count_base_layer_calls(model)
    examples = rows()
    all_targets = target_tokens(collate(examples, 0, CPU))
    loss, own_grads = loss_and_grads(model, share(examples, processes), all_targets, case.kernels)
    sum_gradients(p for p in model.parameters() if p.requires_grad)
    weights = [weight for layer in layers for weight in frozen_layer_weights(layer)]
    return {"loss": global_sums(loss)[0], "own_grads": own_grads,
            "grads": {name: p.grad for name, p in model.named_parameters() if p.requires_grad},
            "whole_layers": whole_layers, "base_calls": len(base_calls),
            "sharded_after_step": not any(map(whole, weights)),
            "held": sum(w.to_local().numel() for w in weights) / sum(w.numel() for w in weights)}


def turn_times(processes: Processes, load_in_4bit: bool) -> tuple[float, float]:
    """When this process started and ended a block of one_process_at_a_time that takes a while."""
    with one_process_at_a_time(processes, ModelSettings(name="any", load_in_4bit=load_in_4bit)):
        started = time.monotonic()  # one clock for all processes of the machine
        time.sleep(1.0)
        return started, time.monotonic()


def saved_and_restored(case: Case, processes: Processes, out: Path) -> dict:
    """The adapter process 0 saves from a sharded model (as a checkpoint does), loaded back into that model after
    its trained parameters were zeroed (as a resume does): the trained parameters it restores."""
    model, _ = build(case, processes)
    if processes.main:
        model.save_pretrained(out / "adapter", selected_adapters=[TRAINED_ADAPTER])
    wait_for_all()
    trained = [parameter for parameter in model.parameters() if parameter.requires_grad]
    with torch.no_grad():
        for parameter in trained:
            parameter.zero_()
    result = set_peft_model_state_dict(model, load_file(out / "adapter" / ADAPTER_WEIGHTS))
    assert not result.unexpected_keys
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def reference_and_policy_losses(model, processes: Processes) -> dict:
    """The losses of the whole batch under DPO's reference adapter and then under the trained one, each process
    computing its share; and whether the reference adapter (frozen, so sharded with the base weights) is sharded."""
    examples = rows()
    batch, all_targets = collate(share(examples, processes), 0, CPU), target_tokens(collate(examples, 0, CPU))
    with reference_policy(model):
        reference_loss = float(summed_token_loss(model, batch)) / all_targets
    policy_loss = float(summed_token_loss(model, batch)) / all_targets
    reference_weights = [p for name, p in model.named_parameters() if f".{REFERENCE_ADAPTER}." in name]
    return {"losses": global_sums(reference_loss, policy_loss),
            "sharded": bool(reference_weights) and not any(map(whole, reference_weights))}


def worker(rank: int, port: int, cases: list[Case], plain: Case, out: Path) -> None:
    """One of the processes, as torchrun starts it: its environment, then ftcli's own process group (gloo). After the
    cases, the checks that need one model trained the `plain` way."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(PROCESSES), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    processes = start_processes()
    try:
        results = {"cases": [sharded_case(case, processes) for case in cases],
                   "turns": {nf4: turn_times(processes, nf4) for nf4 in (False, True)},
                   "restored": saved_and_restored(plain, processes, out),
                   "reference": reference_and_policy_losses(build(plain, processes, out / "reference")[0],
                                                            processes)}
    finally:
        stop_processes()
    torch.save(results, out / f"rank{rank}.pt")


@contextmanager
def gpus_hidden() -> Iterator[None]:
    """The processes started inside see no GPU, so that they run on the CPU with gloo on a GPU machine too (these
    tests compare CPU tensors; tests/test_distributed.py runs whole trainings on two GPUs where there are two); the
    conftest each imports picks the CPU for the kernels too, whatever FTCLI_TEST_DEVICE this process has."""
    hidden = {"CUDA_VISIBLE_DEVICES": "", "FTCLI_TEST_DEVICE": "cpu"}
    before = {name: os.environ.get(name) for name in hidden}
    os.environ.update(hidden)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def reference_adapter(case: Case, out: Path) -> Path:
    """An adapter folder for DPO's reference, other than the trained adapter's start."""
    return make_output_folder(case.folder, out / "reference", seed=5)


def run_sharded(cases: list[Case], plain: Case, out: Path) -> list[dict]:
    """What each process found (results[rank]["cases"][case] and the checks after the cases)."""
    reference_adapter(plain, out)
    with gpus_hidden():
        torch.multiprocessing.start_processes(worker, args=(free_port(), cases, plain, out), nprocs=PROCESSES,
                                              start_method="spawn")
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(PROCESSES)]


def one_process(case: Case) -> tuple[float, dict]:
    model, _ = build(case, Processes())
    examples = rows()
    return loss_and_grads(model, examples, target_tokens(collate(examples, 0, CPU)), case.kernels)


def largest_difference(got: dict, want: dict) -> float:
    """The largest difference of any gradient over the largest gradient."""
    assert got.keys() == want.keys() and want
    return max(float((got[name] - want[name]).abs().max()) for name in want) / max(
        float(grad.abs().max()) for grad in want.values())


def assert_same_step(results: list[dict], case: Case) -> None:
    loss, grads = one_process(case)
    for result in results:
        assert result["loss"] == pytest.approx(loss, rel=1e-5), case
        assert largest_difference(result["grads"], grads) < 1e-4, case
        # the control: one process's share alone is far from the whole batch's gradients
        assert largest_difference(result["own_grads"], grads) > 1e-2, case
        # each process holds half of every frozen layer weight, and a layer is whole only while it computes
        assert result["held"] == pytest.approx(1 / PROCESSES), case
        # every forward of a layer (two layers; transformers 5.17 also counts checkpointing's recomputes) sees it alone
        assert len(result["whole_layers"]) >= 2 and set(result["whole_layers"]) == {1}, case
        assert result["sharded_after_step"], case
        assert (result["base_calls"] == 0) == case.kernels, case


@pytest.fixture(scope="module")
def plain(tiny_model_folder) -> Case:
    return Case(tiny_model_folder("llama"))


@pytest.fixture(scope="module")
def sharded_runs(tiny_model_folder, plain, tmp_path_factory):
    """The fast cases, run once by two processes: every checkpointing mode, NF4 weights, and tied embeddings (the
    head's weight is the embedding's, whole on every process)."""
    cases = [Case(plain.folder, checkpointing=mode) for mode in (False, True, "offload")] + [
        Case(plain.folder, checkpointing=True, load_in_4bit=True), Case(tiny_model_folder("qwen3"), "qwen3")]
    return cases, run_sharded(cases, plain, tmp_path_factory.mktemp("sharded"))


@pytest.mark.parametrize("index", range(5), ids=["no-checkpointing", "checkpointing", "offload", "nf4", "tied"])
def test_two_processes_on_a_sharded_model_take_the_one_process_step(index, sharded_runs):
    cases, results = sharded_runs
    assert_same_step([process["cases"][index] for process in results], cases[index])


def test_processes_load_16_bit_weights_into_host_memory_one_at_a_time(sharded_runs):
    _, results = sharded_runs
    first, second = (process["turns"][False] for process in results)
    assert first[1] <= second[0]
    # the control: loading NF4 weights onto the GPUs, they run the block together
    first, second = (process["turns"][True] for process in results)
    assert second[0] < first[1] and first[0] < second[1]


def test_an_adapter_saved_from_a_sharded_model_loads_back_into_it(sharded_runs, plain):
    model, _ = build(plain, Processes())
    want = {name: p for name, p in model.named_parameters() if p.requires_grad}
    for process in sharded_runs[1]:
        assert process["restored"].keys() == want.keys()
        for name, parameter in want.items():
            assert torch.equal(process["restored"][name], parameter), name


def test_the_reference_adapter_of_dpo_is_sharded_with_the_base_weights(sharded_runs, plain, tmp_path):
    """Loaded before sharding and frozen: each process holds half of it, gathered with its layer."""
    model, _ = build(plain, Processes(), reference_adapter(plain, tmp_path))
    want = reference_and_policy_losses(model, Processes())["losses"]
    assert abs(want[0] - want[1]) > 1e-3  # the control: the two adapters differ
    for process in sharded_runs[1]:
        assert process["reference"]["losses"] == pytest.approx(want, rel=1e-5)
        assert process["reference"]["sharded"]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the kernels in Triton's CPU interpreter, which the GPU "
                    "image's Triton 3.6 refuses for them; on a GPU, `python -m ftcli.bench --gpus 2 --distributed fsdp` "
                    "trains sharded layers through the compiled kernels (tests/test_bench.py)")
def test_the_kernels_compute_the_sharded_layers(plain, tmp_path):
    """16-bit and NF4 weights, all projections through the LoRA kernels (the fused loss too) under Triton's
    interpreter. Without checkpointing, backward reads the weight a kernel's forward kept: FSDP has freed it since
    and gathers it again into the same storage before the layer's backward."""
    cases = [Case(plain.folder, checkpointing=mode, kernels=True, load_in_4bit=nf4)
             for mode, nf4 in ((False, False), ("offload", False), (False, True), (True, True))]
    results = run_sharded(cases, plain, tmp_path)
    for index, case in enumerate(cases):
        assert_same_step([process["cases"][index] for process in results], case)


def test_the_lora_kernels_take_the_quant_state_of_a_gathered_nf4_weight_from_its_module(plain):
    """What FSDP puts in a Linear4bit's place while the layer computes: a plain tensor of the packed bytes."""
    model, _ = build(Case(plain.folder, load_in_4bit=True), Processes())
    projection = model.get_decoder().layers[0].self_attn.o_proj
    base = projection.get_base_layer()
    packed = base.weight
    base._parameters["weight"] = nn.Parameter(packed.as_subclass(torch.Tensor), requires_grad=False)
    weight = _lora_parts(projection)[0]
    assert weight.quant_state is base.quant_state is packed.quant_state
    assert weight.data_ptr() == packed.data_ptr() and weight.shape == packed.shape  # the same bytes, no copy
    del base.quant_state  # the control: without the module's copy the kernels cannot dequantize it
    assert _lora_parts(projection) is None


def test_a_decoder_without_a_list_of_layers_is_refused_with_the_fix():
    class Unsharded(nn.Module):
        def get_decoder(self):
            return nn.Linear(4, 4)

    with pytest.raises(ModelError, match=r"train\.distributed: fsdp shards.*Use train\.distributed: ddp"):
        shard_decoder_layers(Unsharded(), CPU, Processes(rank=0, count=2))
