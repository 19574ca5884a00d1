"""The batched sampler against ftcli's one-prompt decoder: greedy tokens, seeds, stops, top-p, the model's state."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import DEVICE, lora_model
from ftcli.data.templates import end_of_turn_ids, generation_prompt_ids
from ftcli.decoding import Decoder, Sampling
from ftcli.generation import FINISHED_CHECK_EVERY, BatchedSampler, rope_reads_positions_on_the_host
from tiny_models import tiny_config

PROMPTS = [[5, 6, 7], list(range(10, 40)), [3] * 12 + [9, 8]]  # 3, 30 and 14 tokens: two rows are left-padded
GREEDY = Sampling(max_new_tokens=24, temperature=0.0)
HOT = Sampling(max_new_tokens=24, temperature=1.0, top_p=1.0)
PAD = 0


def decoder_greedy(model, prompts: list[list[int]], new_tokens: int, stop_ids=frozenset()) -> list[list[int]]:
    """ftcli chat's greedy answer to each prompt alone (it stops before a stop id; the sampler keeps it)."""
    model.eval()
    decoder = Decoder(model, 256, compile=False)
    return [list(decoder.generate(prompt, Sampling(new_tokens, 0.0), stop_ids)) for prompt in prompts]


def sample(model, prompts, sampling, seed=0, stop_ids=frozenset()):
    generator = torch.Generator(model.device).manual_seed(seed)
    return BatchedSampler(model, stop_ids, PAD, 64).generate(prompts, sampling, generator)


@pytest.fixture
def llama(tiny_model_folder):
    model, _ = lora_model(tiny_model_folder("llama"), "llama", kernels=False)
    return model


# Mistral and Gemma 2 have sliding windows of 16 tokens, shorter than prompt + answer, so they check the 2-D mask
# path through transformers' rolling sliding-window cache; Qwen3 ties its embeddings and has a head_dim of its own.
@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral", "gemma2"])
def test_greedy_batch_equals_the_decoder_prompt_by_prompt(tiny_model_folder, family):
    model, _ = lora_model(tiny_model_folder(family), family, kernels=False)
    completions = sample(model, PROMPTS, GREEDY)
    expected = decoder_greedy(model, PROMPTS, GREEDY.max_new_tokens)
    assert completions.ids == expected
    assert completions.finished == [False] * 3
    with model.disable_adapter():
        assert decoder_greedy(model, PROMPTS, GREEDY.max_new_tokens) != expected  # control: the adapter matters


def test_the_lora_kernels_sample_what_peft_samples(tiny_model_folder):
    """ftcli's fused LoRA ops under a batch with padding (on a GPU, inside the sampler's CUDA graph)."""
    kernel_model, swapped = lora_model(tiny_model_folder("llama"), "llama", kernels=True, device=DEVICE)
    assert swapped["lora_mlp"] and swapped["lora_qkv"]
    peft_model, _ = lora_model(tiny_model_folder("llama"), "llama", kernels=False, device=DEVICE)
    assert sample(kernel_model, PROMPTS, GREEDY).ids == sample(peft_model, PROMPTS, GREEDY).ids


def test_an_nf4_model_samples_as_the_decoder(tiny_model_folder):
    model, _ = lora_model(tiny_model_folder("llama"), "llama", kernels=False, load_in_4bit=True)
    prompts = PROMPTS[:2]
    assert sample(model, prompts, Sampling(8, 0.0)).ids == decoder_greedy(model, prompts, 8)


def test_a_seed_repeats_the_completions_and_another_seed_changes_them(llama):
    prompts = [PROMPTS[0]] * 4 + [PROMPTS[1]] * 4  # GRPO's layout: each prompt G times
    first, again, other = (sample(llama, prompts, HOT, seed) for seed in (1, 1, 2))
    assert first == again
    assert first.ids != other.ids
    assert len({tuple(ids) for ids in first.ids[:4]}) > 1  # the copies of one prompt differ: one draw per row
    assert first.ids[:4] != [sample(llama, PROMPTS[:1], GREEDY).ids[0]] * 4


def test_a_tiny_top_p_keeps_only_the_likeliest_token(llama):
    nucleus = Sampling(max_new_tokens=24, temperature=1.0, top_p=1e-6)
    assert sample(llama, PROMPTS, nucleus, seed=5).ids == sample(llama, PROMPTS, GREEDY).ids


def test_rows_stop_at_their_first_stop_id_and_keep_it(llama):
    greedy = sample(llama, PROMPTS, GREEDY).ids
    stops = {greedy[0][3], greedy[1][10]}  # the first two rows stop at different lengths
    assert not stops & set(greedy[2])
    ends = [next(i for i, token in enumerate(row) if token in stops) for row in greedy[:2]]
    completions = sample(llama, PROMPTS, GREEDY, stop_ids=stops)
    assert completions.ids == [greedy[0][:ends[0] + 1], greedy[1][:ends[1] + 1], greedy[2]]
    assert completions.finished == [True, True, False]
    assert ends[0] != ends[1]


def test_every_row_stopping_ends_the_batch_early(llama):
    greedy = sample(llama, PROMPTS, GREEDY).ids
    stops = {row[1] for row in greedy}
    forwards = []
    hook = llama.get_base_model().register_forward_hook(lambda *_: forwards.append(1))
    completions = sample(llama, PROMPTS, Sampling(max_new_tokens=200, temperature=0.0), stop_ids=stops)
    hook.remove()
    assert completions.finished == [True] * 3
    assert all(len(ids) <= 2 for ids in completions.ids)
    assert len(forwards) == FINISHED_CHECK_EVERY  # the prefill, then steps until the first look at the rows


def test_max_new_tokens_cuts_the_rows_that_did_not_stop(llama):
    completions = sample(llama, PROMPTS, Sampling(max_new_tokens=5, temperature=1.0, top_p=0.9), seed=3)
    assert [len(ids) for ids in completions.ids] == [5, 5, 5]
    assert completions.finished == [False] * 3


def test_the_model_comes_back_as_it_was(tiny_model_folder):
    """Training mode, requires_grad and offloaded checkpointing survive; LoRA dropout, which would make greedy
    answers random in training mode, shows that generation ran in eval mode."""
    model, _ = lora_model(tiny_model_folder("llama"), "llama", kernels=False, checkpointing="offload", dropout=0.3)
    model.get_base_model().lm_head.eval()  # one module's own mode, which a plain model.train() would lose
    modes = {name: module.training for name, module in model.named_modules()}
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    completions = sample(model, PROMPTS, GREEDY)
    assert {name: module.training for name, module in model.named_modules()} == modes
    assert {name for name, parameter in model.named_parameters() if parameter.requires_grad} == trainable
    assert completions.ids == decoder_greedy(model, PROMPTS, GREEDY.max_new_tokens)


class HostReads(TorchDispatchMode):
    """Counts the ops that copy a tensor's value to Python (`.item()`, `bool(tensor)`): on a GPU each one waits for
    the GPU to catch up, and inside a CUDA graph capture it is an error."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def rope_model(family: str, parameters=None):
    config = tiny_config(family, 320)
    if parameters:
        config.rope_parameters = parameters | {"rope_theta": 10000.0}
    return AutoModelForCausalLM.from_config(config)


def host_reads(model, sampling: Sampling) -> int:
    reads = HostReads()
    with reads:
        sample(model, PROMPTS, sampling)
    return reads.count


def test_sampling_reads_the_host_only_when_it_looks_whether_every_row_stopped(llama):
    """The prefill, every decode step (the forward a CUDA graph captures) and the sampling run without a host read;
    the control, a model whose RoPE scaling reads the largest position, shows the count sees one."""
    hot = Sampling(max_new_tokens=24, temperature=1.0, top_p=0.9)
    looks = (hot.max_new_tokens - 1) // FINISHED_CHECK_EVERY  # after 8 and 16 tokens; the 24th is the last
    assert host_reads(llama, hot) == looks == 2
    assert host_reads(rope_model("llama", {"rope_type": "dynamic", "factor": 2.0}), hot) > looks


def test_only_rope_scaling_that_reads_positions_on_the_host_keeps_the_step_out_of_a_graph():
    assert rope_reads_positions_on_the_host(rope_model("llama", {"rope_type": "dynamic", "factor": 2.0}))
    assert not rope_reads_positions_on_the_host(rope_model("llama", {"rope_type": "linear", "factor": 2.0}))
    assert not rope_reads_positions_on_the_host(rope_model("llama"))
    assert not rope_reads_positions_on_the_host(rope_model("gemma3_text"))  # a RoPE type per kind of layer


@pytest.mark.parametrize("prompts, new_tokens", [([[]], 4), ([list(range(65))], 4), ([[5]], 0), ([], 4)])
def test_what_the_caller_must_not_pass_is_refused(llama, prompts, new_tokens):
    with pytest.raises(ValueError, match="sampler"):
        sample(llama, prompts, Sampling(new_tokens, 0.0))


def test_greedy_batch_of_chat_prompts_equals_the_decoder_on_the_fixture(smollm2_folder):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    model = AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32)
    questions = ["What is 2 + 3?", "Name a colour.",
                 "A farmer has 12 apples and gives away 5, then buys twice as many as he has left. How many now?"]
    prompts = [generation_prompt_ids(tokenizer, [{"role": "user", "content": q}]) for q in questions]
    assert len({len(prompt) for prompt in prompts}) == 3
    stops = end_of_turn_ids(tokenizer, model.generation_config)
    completions = BatchedSampler(model, stops, tokenizer.pad_token_id, 128).generate(
        prompts, Sampling(24, 0.0), torch.Generator().manual_seed(0))
    answers = decoder_greedy(model, prompts, 24, stops)
    (end_of_turn,) = stops
    assert completions.ids == [answers[0] + [end_of_turn], answers[1] + [end_of_turn], answers[2]]
    assert completions.finished == [True, True, False]  # the arithmetic needs more than 24 tokens
    assert tokenizer.decode(completions.ids[0]) == "2 + 3 = 5<|im_end|>"
