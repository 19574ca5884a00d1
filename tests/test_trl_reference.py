"""The TRL reference drives TRL correctly: its DPO losses and rewards, and its GRPO loss and gradients, equal a
plain-PyTorch computation, float32, on conftest.DEVICE: on a GPU TRL's trainers run its fused LM head as compiled
Triton, which takes CUDA tensors only; on a CPU, in Triton's interpreter."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, randomise
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from ftcli.recipe import DEFAULT_TARGET_MODULES
from trl_reference import trl_dpo_reference, trl_grpo_loss

BETA = 0.5


@pytest.fixture(scope="module")
def policy(tiny_model_folder):
    """A tiny Llama with a LoRA adapter whose B is random, so that the policy differs from its reference, on
    DEVICE."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_folder("llama"), dtype=torch.float32)
    torch.manual_seed(0)
    adapted = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=DEFAULT_TARGET_MODULES))
    randomise(adapted, "lora_B", 0.2, seed=1)
    return adapted.to(DEVICE).eval()


@pytest.fixture(scope="module")
def pairs(policy):
    """Three pairs of unequal lengths: prompt, chosen and rejected ids drawn at random (never padding's 0)."""
    generator = torch.Generator().manual_seed(2)
    draw = lambda n: torch.randint(3, policy.config.vocab_size, (n,), generator=generator).tolist()
    return [(draw(5), draw(4), draw(7)), (draw(1), draw(6), draw(2)), (draw(9), draw(3), draw(3))]


def answer_logps(model, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """Sum of log p(answer token | everything before it) from the model's full logits, on the CPU, where TRL's
    results come back."""
    ids = torch.tensor([prompt + answer], device=model.device)
    with torch.no_grad():
        logps = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
    return logps[len(prompt) - 1:].gather(1, ids[0, len(prompt):, None]).sum().cpu()


def plain_log_ratios(model, pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair, policy minus adapter-off reference summed log-probs of the chosen and of the rejected answer."""
    def answers(which: int) -> torch.Tensor:
        return torch.stack([answer_logps(model, pair[0], pair[which]) for pair in pairs])

    policy_chosen, policy_rejected = answers(1), answers(2)
    with model.disable_adapter():
        reference_chosen, reference_rejected = answers(1), answers(2)
    return policy_chosen - reference_chosen, policy_rejected - reference_rejected


def plain_losses(loss_type: str, label_smoothing: float, chosen: torch.Tensor, rejected: torch.Tensor,
                 pairs) -> torch.Tensor:
    margin = BETA * (chosen - rejected)
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    if loss_type == "hinge":
        return torch.relu(1 - margin)
    lengths = torch.tensor([[len(pair[1]), len(pair[2])] for pair in pairs], dtype=torch.float64)
    return (chosen / lengths[:, 0] - rejected / lengths[:, 1] - 1 / (2 * BETA)) ** 2


@pytest.mark.parametrize("loss_type, label_smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0),
                                                          ("hinge", 0.0)])
def test_trl_reference_equals_plain_dpo_from_full_logits(policy, pairs, loss_type, label_smoothing, tmp_path):
    chosen, rejected = plain_log_ratios(policy, pairs)
    assert chosen.abs().min() > 0.05 and rejected.abs().min() > 0.05  # the adapter really moves the policy
    trl = trl_dpo_reference(policy, pairs, BETA, loss_type, label_smoothing, output_dir=str(tmp_path))

    expected = plain_losses(loss_type, label_smoothing, chosen, rejected, pairs)
    torch.testing.assert_close(trl.losses.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(trl.chosen_rewards.double(), BETA * chosen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(trl.rejected_rewards.double(), BETA * rejected, rtol=1e-5, atol=1e-5)
    if loss_type == "sigmoid":  # a policy equal to its reference would give log 2 for every pair
        assert (trl.losses - math.log(2)).abs().min() > 1e-3


def test_trl_reference_leaves_the_model_alone(policy, pairs, tmp_path):
    before = {name: parameter.clone() for name, parameter in policy.state_dict().items()}
    forward = policy.get_base_model().forward
    trl_dpo_reference(policy, pairs[:1], BETA, output_dir=str(tmp_path))
    trl_grpo_loss(policy, [pairs[0][0]] * 2, list(pairs[0][1:]), torch.tensor([1.0, -1.0]), beta=0.1, epsilon=0.2,
                  loss_type="grpo", max_completion_length=8, pad_id=0, output_dir=str(tmp_path))
    assert policy.get_base_model().forward == forward
    assert all(torch.equal(before[name], parameter) for name, parameter in policy.state_dict().items())


def test_trl_reference_refuses_label_smoothing_trl_would_ignore(policy, pairs):
    with pytest.raises(ValueError, match="ignores label_smoothing"):
        trl_dpo_reference(policy, pairs, BETA, "hinge", label_smoothing=0.1)


def completion_logps(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log p(completion token | everything before it) per completion token, from the model's full logits."""
    ids = torch.tensor([prompt + completion], device=model.device)
    logps = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    return logps[len(prompt) - 1:].gather(1, ids[0, len(prompt):, None])[:, 0]


def plain_grpo_loss(model, prompts, completions, advantages, beta: float, epsilon: float, loss_type: str,
                    max_completion_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The published objective, one completion at a time: per token -min(r A, clip(r, 1 - e, 1 + e) A) + beta KL,
    r = pi / pi_old with pi_old the sampling policy (the same weights, detached), KL = ref/pi - log(ref/pi) - 1
    (the DeepSeekMath estimator); GRPO averages each completion over its tokens and then over completions,
    Dr. GRPO sums all tokens over completions x max_completion_length. Returns the loss and the mean KL."""
    token_losses, kls = [], []
    for prompt, completion, advantage in zip(prompts, completions, advantages):
        logps = completion_logps(model, prompt, completion)
        ratio = torch.exp(logps - logps.detach())
        loss = -torch.min(ratio * advantage, ratio.clamp(1 - epsilon, 1 + epsilon) * advantage)
        with torch.no_grad(), model.disable_adapter():
            reference = completion_logps(model, prompt, completion)
        kl = torch.exp(reference - logps) - (reference - logps) - 1
        token_losses.append(loss + beta * kl)
        kls.append(kl.detach())
    if loss_type == "grpo":
        loss = torch.stack([losses.mean() for losses in token_losses]).mean()
    else:
        loss = torch.cat(token_losses).sum() / (len(completions) * max_completion_length)
    return loss, torch.cat(kls).mean()


def lora_gradients(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: parameter.grad.clone() for name, parameter in model.named_parameters() if "lora_" in name}


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_trl_grpo_loss_equals_plain_grpo_and_its_gradients(policy, loss_type, beta, tmp_path):
    generator = torch.Generator().manual_seed(4)
    draw = lambda n: torch.randint(3, policy.config.vocab_size, (n,), generator=generator).tolist()
    prompts = [draw(5), draw(5), draw(2), draw(2)]  # two groups of two: unequal prompts, so TRL left-pads
    completions = [draw(4), draw(7), draw(1), draw(6)]
    advantages = torch.tensor([0.7, -0.7, -1.2, 1.2], device=DEVICE)
    settings = dict(beta=beta, epsilon=0.2, loss_type=loss_type, max_completion_length=8)

    expected, kl = plain_grpo_loss(policy, prompts, completions, advantages, **settings)
    expected_gradients = lora_gradients(policy, expected)
    trl = trl_grpo_loss(policy, prompts, completions, advantages, pad_id=0, output_dir=str(tmp_path), **settings)
    trl_gradients = lora_gradients(policy, trl)

    assert trl.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    # A and B of the seven targets in both layers
    assert trl_gradients.keys() == expected_gradients.keys() and len(trl_gradients) == 2 * 7 * 2
    for name, gradient in expected_gradients.items():
        torch.testing.assert_close(trl_gradients[name], gradient, rtol=1e-4, atol=1e-6)
    # the controls: the gradients are not zero, and with beta the adapter moves the policy off its reference, so
    # the KL term counts in the loss (without it the loss is -mean advantage, 0 for grpo here)
    assert min(gradient.abs().max() for gradient in expected_gradients.values()) > 1e-4
    if beta:
        assert beta * kl > 1e-3
