"""Attention replayed in the checkpoint's recompute (ftcli/attention_replay.py): the losses and gradients of
transformers' own SDPA attention, with the attention kernel of a marked layer run once per step instead of twice;
the slot emptied by backward, and left alone by evaluation; under CUDA graphs on a GPU."""

import pytest
import torch
import torch.nn.functional as F

import ftcli.attention_replay as attention_replay
from conftest import DEVICE, lora_model
from ftcli.step_graph import CAUSAL_ATTENTION, GraphedMicroBatch
from ftcli.train import summed_token_loss
from test_step_graph import train


def loss_and_grads(model, input_ids):
    logits = model(input_ids=input_ids).logits[:, :-1].float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def attending_model(folder, family, checkpointing, replayed: int, dtype=torch.float32, hosted=False):
    """The tiny model with LoRA, checkpointed through OffloadedCheckpoint, attending through CAUSAL_ATTENTION (as a
    graphed micro-batch does), the top `replayed` layers' attention marked (their outputs hosted when asked)."""
    model, _ = lora_model(folder, family, kernels=False, checkpointing=checkpointing, keeps_blocks=True, dtype=dtype,
                          device=DEVICE)
    model.set_attn_implementation(CAUSAL_ATTENTION)
    assert attention_replay.replay_attention(model, replayed, hosted) == min(replayed, model.config.num_hidden_layers)
    return model


def counted_kernels(monkeypatch) -> list:
    """Record each forward of the replay kernels: the shapes of its query and key."""
    calls = []
    for key, kernel in list(attention_replay.KERNELS.items()):
        def forward(*args, kernel=kernel):
            calls.append((args[0].shape, args[1].shape))
            return kernel.forward(*args)
        monkeypatch.setitem(attention_replay.KERNELS, key, kernel._replace(forward=forward))
    return calls


@pytest.mark.parametrize("checkpointing", ["offload", True])
@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3", "gemma3_text"])
def test_replayed_attention_gives_sdpas_losses_and_gradients(family, checkpointing, tiny_model_folder, monkeypatch):
    """On the 2-layer models (grouped key and value heads), two steps: the replayed layers' attention runs once a
    step, in the forward, and not in the recompute, on the grouped heads as they are, as SDPA takes them; the losses
    and gradients are those of SDPA attention, exactly on the CPU (the same flash kernel), in float32."""
    calls = counted_kernels(monkeypatch)
    input_ids = torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    folder = tiny_model_folder(family)
    plain, replayed = (attending_model(folder, family, checkpointing, layers) for layers in (0, 2))
    for _ in range(2):
        want_loss, want_grads = loss_and_grads(plain, input_ids)
        assert not calls
        loss, grads = loss_and_grads(replayed, input_ids)
        if DEVICE.type == "cpu":
            assert len(calls) == 2 and loss == want_loss
            assert all(key[1] < query[1] for query, key in calls)  # fewer key heads: not repeated
            for name, grad in want_grads.items():
                assert torch.equal(grads[name], grad), name
        calls.clear()
        with torch.no_grad():  # the next step's adapters
            for model in (plain, replayed):
                for p in model.parameters():
                    if p.requires_grad:
                        p.add_(0.01)
    slots = [module.attention_replay for module in replayed.modules() if hasattr(module, "attention_replay")]
    assert len(slots) == 2 and all(slot.kept is None for slot in slots)  # backward took what each forward kept


@pytest.mark.parametrize("checkpointing", ["offload", True])
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_hosted_outputs_give_the_same_losses_and_gradients(family, checkpointing, tiny_model_folder, monkeypatch):
    """With the outputs hosted, the lower layer's kept output waits in CPU memory between its forward and its
    recompute (the top layer's stays on the device), and the losses and gradients are those of the outputs kept on
    the device: exactly on the CPU, where the copies are plain copies; on a GPU in bfloat16 within the rounding of
    its attention backward's order of summation."""
    calls = counted_kernels(monkeypatch)
    input_ids = torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    folder = tiny_model_folder(family)
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    kept, hosted = (attending_model(folder, family, checkpointing, 2, dtype, hosted) for hosted in (False, True))
    top, lower = [module.attention_replay for module in hosted.modules() if hasattr(module, "attention_replay")][::-1]
    assert not top.hosted and lower.hosted
    want_loss, want_grads = loss_and_grads(kept, input_ids)
    hosted(input_ids=input_ids)
    assert isinstance(top.kept.out, torch.Tensor) and lower.kept.out.host.device.type == "cpu"
    # The output waits in CPU memory as the kernel laid it out, which need not be its dimensions' order
    assert lower.kept.out.host.is_contiguous() and lower.kept.out.host.numel() == top.kept.out.numel()
    calls.clear()
    loss, grads = loss_and_grads(hosted, input_ids)
    assert len(calls) == 2 and top.kept is None and lower.kept is None
    if DEVICE.type == "cpu":
        assert loss == want_loss
        for name, grad in want_grads.items():
            assert torch.equal(grads[name], grad), name
    else:  # the same kernels on the same tensors, whose backward may sum in another order from run to run
        assert loss == pytest.approx(want_loss, rel=1e-3)
        for name, grad in want_grads.items():
            torch.testing.assert_close(grads[name].float(), grad.float(), rtol=1e-2, atol=1e-3, msg=name)


def test_evaluation_leaves_the_slots_alone(tiny_model_folder, monkeypatch):
    """A forward without gradients (evaluation) attends through SDPA and keeps nothing; a training forward keeps each
    marked layer's output until its backward; the next training forward replaces it. In bfloat16 on a GPU, whose
    fused kernels take no float32; the loss is the unmarked model's, within bfloat16's rounding there."""
    calls = counted_kernels(monkeypatch)
    input_ids = torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    dtype, loss_tolerance = (torch.bfloat16, 1e-2) if DEVICE.type == "cuda" else (torch.float32, 1e-6)
    model = attending_model(tiny_model_folder("llama"), "llama", "offload", 1, dtype)
    slot = next(module.attention_replay for module in model.modules() if hasattr(module, "attention_replay"))
    with torch.no_grad():
        model(input_ids=input_ids)
    assert slot.kept is None and not calls
    model(input_ids=input_ids)
    first = slot.kept
    assert first is not None and first.out.shape == (2, 4, 11, 16) and len(calls) == 1
    want_loss, _ = loss_and_grads(model, input_ids)  # a second forward, then its backward
    assert slot.kept is None and len(calls) == 2
    plain = attending_model(tiny_model_folder("llama"), "llama", "offload", 0, dtype)
    assert want_loss == pytest.approx(loss_and_grads(plain, input_ids)[0], rel=loss_tolerance)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="the GPU's fused kernels and CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("hosted", [False, True])
@pytest.mark.parametrize("checkpointing", ["offload", True])
def test_replayed_attention_in_cuda_graphs_on_the_gpus_kernels(checkpointing, hosted, tiny_model_folder, monkeypatch):
    """In bfloat16 on a GPU (SDPA's flash or cuDNN kernel, the kernels the replay calls directly), replayed as CUDA
    graphs, two steps of two micro-batches: the losses and gradients of the unmarked model within bfloat16's
    rounding of the two kernels' orders of summation."""
    calls = counted_kernels(monkeypatch)
    results = []
    for layers in (0, 2):
        model, _ = lora_model(tiny_model_folder("llama"), "llama", kernels=True, checkpointing=checkpointing,
                              keeps_blocks=True, dtype=torch.bfloat16, device=DEVICE)
        attention_replay.replay_attention(model, layers, hosted)
        trainable = [p for p in model.parameters() if p.requires_grad]
        graphed = GraphedMicroBatch(model, lambda batch, model=model: summed_token_loss(model, batch, fused=True),
                                    trainable)
        results.append(train(model, graphed))
        assert bool(calls) == bool(layers)  # the kernels ran, in the warm-up and the capture
    (want_losses, want_grads), (losses, grads) = results
    assert losses == pytest.approx(want_losses, rel=2e-2)
    for step_grads, step_want in zip(grads, want_grads):
        for grad, want in zip(step_grads, step_want):
            torch.testing.assert_close(grad.float(), want.float(), rtol=5e-2, atol=5e-3)
