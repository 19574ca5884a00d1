"""The batched sampler on a CUDA GPU, as GRPO runs it: the decode step replayed as a CUDA graph gives the eager
step's tokens (bf16 with ftcli's kernels, and NF4), and the memory it took is free again when it returns."""

import pytest
import torch

from conftest import randomise
from ftcli.architectures import ARCHITECTURES
from ftcli.decoding import Decoder, Sampling
from ftcli.generation import BatchedSampler
from ftcli.loader import load_model
from ftcli.plan import CheckpointingChoice
from ftcli.recipe import LoraSettings, ModelSettings
from ftcli.train import prepare_for_training

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = [[5, 6, 7], list(range(10, 40)), [3] * 12 + [9, 8]]  # two rows are left-padded
GREEDY = Sampling(max_new_tokens=24, temperature=0.0)
PAD = 0


def training_model(folder, family: str, load_in_4bit: bool, dtype: str = "bfloat16"):
    """The tiny model as `ftcli train` prepares it on a GPU: kernels, offloaded checkpointing, LoRA (B made
    non-zero so it matters), in training mode."""
    architecture = ARCHITECTURES[family]
    settings = ModelSettings(name=str(folder), load_in_4bit=load_in_4bit, dtype=dtype)
    model = load_model(settings, architecture, torch.device("cuda"), getattr(torch, dtype))
    model, swaps = prepare_for_training(model, architecture, LoraSettings(r=4, alpha=8), kernels=True,
                                        checkpointing=CheckpointingChoice("offload"), seed=3)
    randomise(model, "lora_B", 0.05, seed=2)
    return model.train(), swaps


def generate(sampler: BatchedSampler, sampling: Sampling, seed: int = 0, prompts=PROMPTS):
    return sampler.generate(prompts, sampling, torch.Generator("cuda").manual_seed(seed))


@pytest.mark.parametrize("load_in_4bit", [False, True], ids=["bf16", "nf4"])
def test_the_graph_replay_samples_what_the_eager_step_samples(tiny_model_folder, load_in_4bit):
    model, swaps = training_model(tiny_model_folder("llama"), "llama", load_in_4bit)
    assert swaps.module_counts["lora_mlp"] and swaps.module_counts["lora_qkv"]
    sampler = BatchedSampler(model, set(), PAD, 64)
    assert sampler.graphed
    hot = Sampling(max_new_tokens=24, temperature=1.0, top_p=0.9)
    graphed = [generate(sampler, GREEDY), generate(sampler, hot, seed=4), generate(sampler, hot, seed=4)]
    sampler.graphed = False
    eager = [generate(sampler, GREEDY), generate(sampler, hot, seed=4)]
    assert graphed[0] == eager[0]
    assert graphed[1] == graphed[2] == eager[1]
    assert model.training


def test_the_cache_and_graph_are_freed_before_generate_returns(tiny_model_folder):
    model, _ = training_model(tiny_model_folder("llama"), "llama", load_in_4bit=False)
    sampler = BatchedSampler(model, set(), PAD, 64)
    long, prompts = Sampling(max_new_tokens=200, temperature=1.0, top_p=0.9), PROMPTS * 8
    generate(sampler, long, prompts=prompts)  # what stays from a first call (cuBLAS workspaces) is there by now
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    generate(sampler, long, prompts=prompts)
    torch.cuda.synchronize()
    config = model.config
    cache_bytes = (2 * config.num_hidden_layers * len(prompts) * config.num_key_value_heads
                   * (config.hidden_size // config.num_attention_heads) * (len(PROMPTS[1]) + long.max_new_tokens) * 2)
    assert torch.cuda.max_memory_allocated() - before >= cache_bytes  # the cache was there while it decoded
    assert torch.cuda.memory_allocated() == before


def test_sliding_window_models_decode_eagerly_and_as_the_decoder(tiny_model_folder):
    model, _ = training_model(tiny_model_folder("mistral"), "mistral", load_in_4bit=False, dtype="float32")
    sampler = BatchedSampler(model, set(), PAD, 64)
    assert not sampler.graphed
    completions = generate(sampler, GREEDY)
    decoder = Decoder(model.eval(), 256, compile=False)
    assert completions.ids == [list(decoder.generate(prompt, GREEDY)) for prompt in PROMPTS]
