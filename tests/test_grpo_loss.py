"""GRPO's advantages, loss and LoRA gradients against the published formulas, written out here in plain PyTorch
over the full logits of each completion in its own forward, on tiny models, float32.

The step under test is ftcli's: prompts in two micro-batches, each answered G times by a generation engine (here
one that hands out fixed completions, so both sides score the same ones), rewarded by the built-in length reward,
the completions' tokens scored from the hidden states, the loss averaged over the step's completions. The reference
applies the DeepSeekMath / Dr. GRPO formulas to each completion as the papers write them.
"""

import pytest
import torch

from conftest import DEVICE, lora_model
from ftcli.data.templates import PromptExample
from ftcli.decoding import Sampling
from ftcli.generation import Completions
from ftcli.grpo import GrpoMethod
from ftcli.grpo_losses import STD_FLOOR, group_advantages
from ftcli.recipe import Recipe
from ftcli.rewards import load_rewards
from test_preference_loss import assert_same_gradients, lora_gradients

LOSS_TOLERANCE = dict(rel=1e-5, abs=1e-6)  # float32 both sides; the loss is a difference of terms near 0
GENERATIONS = 3
MAX_COMPLETION = 6
LENGTH_TARGET = 4  # the length reward: 1 at 4 tokens, falling to 0 at 0 and 8
VARIANTS = {  # name: grpo section besides the shared fields
    "grpo": {"loss_type": "grpo"},
    "grpo-kl": {"loss_type": "grpo", "beta": 0.2},
    "dr_grpo": {"loss_type": "dr_grpo", "scale_rewards": False},
    "dr_grpo-kl": {"loss_type": "dr_grpo", "beta": 0.05},
}


class FixedCompletions:
    """A generation engine that answers with given completions, in order, whatever it is asked."""

    def __init__(self, completions: list[list[int]], finished: list[bool]):
        self.completions, self.finished = completions, finished
        self.asked: list[list[int]] = []

    def generate(self, prompts: list[list[int]], sampling: Sampling, generator: torch.Generator) -> Completions:
        start = len(self.asked)
        self.asked += prompts
        return Completions(self.completions[start:start + len(prompts)], self.finished[start:start + len(prompts)])


def make_rollout(seed: int, prompts: int = 2):
    """Prompts of varied lengths and GENERATIONS completions of each, of varied lengths (1 to MAX_COMPLETION)."""
    generator = torch.Generator().manual_seed(seed)
    ids = lambda low, high: torch.randint(3, 300, (int(torch.randint(low, high + 1, (), generator=generator)),),
                                          generator=generator).tolist()
    examples = [PromptExample(ids(2, 6), f"prompt {index}", {}, f"row {index}") for index in range(prompts)]
    completions = [ids(1, MAX_COMPLETION) for _ in range(prompts * GENERATIONS)]
    return examples, completions


def recipe(folder, grpo: dict) -> Recipe:
    rewards = [{"builtin": "length", "target": LENGTH_TARGET}]
    return Recipe(model={"name": str(folder), "dtype": "float32", "max_seq_length": 64},
                  data={"path": "prompts.jsonl", "format": "prompts"}, train={"method": "grpo", "batch_size": 1},
                  grpo={"num_generations": GENERATIONS, "max_prompt_length": 16, "max_completion_length": MAX_COMPLETION,
                        "rewards": rewards} | grpo)


def grpo_method(model, settings: Recipe, completions: list[list[int]], fused: bool = False) -> GrpoMethod:
    tokenizer = type("Tokenizer", (), {"pad_token_id": 0, "batch_decode": lambda self, ids, **_: [str(i) for i in ids]})()
    method = GrpoMethod(settings, tokenizer, model.device, fused, load_rewards(settings.grpo.rewards))
    method.engine = FixedCompletions(completions, [len(c) < MAX_COMPLETION for c in completions])
    return method


def token_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log p of each completion token, from the full logits of one forward over prompt + completion."""
    logits = model(input_ids=torch.tensor([prompt + completion])).logits[0].float()
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)
    return logits.log_softmax(-1)[positions, torch.tensor(completion)]


def length_reward(completion: list[int]) -> float:
    return max(0.0, 1 - abs(len(completion) - LENGTH_TARGET) / LENGTH_TARGET)


def formula_loss(model, settings: dict, examples: list[PromptExample], completions: list[list[int]]) -> torch.Tensor:
    """The step's loss as the papers write it: advantages within each prompt's group, then per completion
    -min(r A, clip(r) A) + beta KL per token, averaged over its tokens (GRPO) or summed and divided by the longest
    allowed completion (Dr. GRPO), then averaged over the completions."""
    beta, scale = settings.get("beta", 0.0), settings.get("scale_rewards", True)
    losses = []
    for index, completion in enumerate(completions):
        example = examples[index // GENERATIONS]
        group = completions[index // GENERATIONS * GENERATIONS:][:GENERATIONS]
        rewards = torch.tensor([length_reward(c) for c in group])
        advantage = length_reward(completion) - rewards.mean()
        if scale:
            advantage = advantage / (rewards.std() + STD_FLOOR)
        logprobs = token_logprobs(model, example.prompt_ids, completion)
        ratio = torch.exp(logprobs - logprobs.detach())
        token_loss = -torch.min(ratio * advantage, ratio.clamp(0.8, 1.2) * advantage)
        if beta:
            with torch.no_grad(), model.disable_adapter():
                reference = token_logprobs(model, example.prompt_ids, completion)
            token_loss = token_loss + beta * (torch.exp(reference - logprobs) - (reference - logprobs) - 1)
        losses.append(token_loss.mean() if settings["loss_type"] == "grpo" else token_loss.sum() / MAX_COMPLETION)
    return torch.stack(losses).mean()


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 2.0, 2.0, 2.0])
    scaled = group_advantages(rewards, 3, scale=True)
    std = torch.tensor([1.0, 0.0, 0.0]).std()
    torch.testing.assert_close(scaled[:3], torch.tensor([2 / 3, -1 / 3, -1 / 3]) / (std + STD_FLOOR))
    assert scaled[3:].tolist() == [0.0, 0.0, 0.0]  # a group of equal rewards teaches nothing
    torch.testing.assert_close(group_advantages(rewards, 3, scale=False)[:3], torch.tensor([2 / 3, -1 / 3, -1 / 3]))


def test_a_completion_without_a_reward_is_left_out_of_its_group():
    advantages = group_advantages(torch.tensor([1.0, float("nan"), 0.0, 3.0]), 4, scale=False)
    torch.testing.assert_close(advantages, torch.tensor([-1 / 3, 0.0, -4 / 3, 5 / 3]))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "phi3"])
def test_step_loss_and_gradients_equal_the_formula(family, variant, tiny_model_folder):
    settings = VARIANTS[variant]
    model, _ = lora_model(tiny_model_folder(family), family, kernels=False)
    examples, completions = make_rollout(seed=len(family) + len(variant))
    method = grpo_method(model, recipe(tiny_model_folder(family), settings), completions)

    result = method.accumulate_gradients(model, [examples[:1], examples[1:]])
    grads = lora_gradients(model)
    want = formula_loss(model, settings, examples, completions)
    want.backward()

    assert result.loss == pytest.approx(float(want), **LOSS_TOLERANCE)
    assert_same_gradients(grads, lora_gradients(model))
    assert result.tokens == sum(len(examples[i // GENERATIONS].prompt_ids) + len(c) for i, c in enumerate(completions))
    assert method.engine.asked == [e.prompt_ids for e in examples for _ in range(GENERATIONS)]
    assert ("kl" in result.metrics) == ("beta" in settings)


def test_metrics_of_a_step(tiny_model_folder):
    folder = tiny_model_folder("llama")
    model, _ = lora_model(folder, "llama", kernels=False)
    examples, completions = make_rollout(seed=4)
    method = grpo_method(model, recipe(folder, {"beta": 0.1}), completions)
    metrics = method.accumulate_gradients(model, [examples]).metrics

    rewards = torch.tensor([length_reward(c) for c in completions])
    assert metrics["reward"] == pytest.approx(float(rewards.mean()), rel=1e-6)
    assert metrics["reward/length"] == pytest.approx(float(rewards.mean()), rel=1e-6)
    assert metrics["reward_std"] == pytest.approx(float(rewards.view(-1, GENERATIONS).std(1).mean()), rel=1e-5)
    assert metrics["completion_length"] == pytest.approx(sum(map(len, completions)) / len(completions))
    assert metrics["clipped_ratio"] == pytest.approx(sum(len(c) == MAX_COMPLETION for c in completions) / len(completions))
    assert metrics["kl"] > 0  # B is non-zero: the policy differs from the adapter-off reference
    assert metrics["generation_s"] >= 0


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: the head's soft-capping
def test_fused_scoring_with_kernels_equals_unfused(family, tiny_model_folder):
    """kernels: true (the patched model, completions scored through the chunked kernel) against plain peft with
    full logits: the same loss and LoRA gradients, KL term included."""
    folder = tiny_model_folder(family)
    examples, completions = make_rollout(seed=12)
    results = []
    for kernels in (True, False):
        model, swapped = lora_model(folder, family, kernels=kernels, device=DEVICE)
        assert bool(swapped) == kernels
        method = grpo_method(model, recipe(folder, {"beta": 0.1}), completions, fused=kernels)
        results.append((method.accumulate_gradients(model, [examples]).loss, lora_gradients(model)))
    (loss, grads), (want_loss, want_grads) = results
    assert loss == pytest.approx(want_loss, rel=1e-5)
    assert_same_gradients(grads, want_grads)
