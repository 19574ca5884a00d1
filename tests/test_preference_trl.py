"""ftcli's DPO losses and rewards equal TRL's DPOTrainer's (tests/trl_reference.py) on the same tiny model,
adapter and pairs, float32, both on conftest.DEVICE (TRL's fused LM head is compiled Triton on a GPU, which takes
CUDA tensors only): sigmoid, conservative DPO (label smoothing), hinge.

ftcli's side is its own step: the pairs in one micro-batch, one forward over both answers (the prompt shared where
the model allows it), the reference the same model with its adapter off. IPO is left out: TRL averages each
answer's log-ratio over its tokens before the squared loss, while ftcli follows the IPO paper and uses the sums, so
the two differ by design; tests/test_preference_loss.py holds ftcli's IPO to the paper's formula.
"""

import math

import pytest
import torch

from conftest import DEVICE, lora_model
from ftcli.data.templates import PreferenceExample
from ftcli.preference import PreferenceMethod
from test_preference_loss import LOSS_TOLERANCE, recipe
from trl_reference import trl_dpo_reference

FAMILIES = ["llama", "qwen3"]  # Qwen3 adds its q/k norms and untied head to Llama's shape
VARIANTS = [("sigmoid", 0.0, 0.5), ("sigmoid", 0.2, 0.5), ("hinge", 0.0, 2.0)]  # loss type, label smoothing, beta
PAD_ID = 0
# A reward is beta times a log-ratio of answers' summed log-probabilities (about 40 nats here, so one float32 rounding
# step is 4e-6), summed in another order on either side: log-ratios agree to 2e-5
LOG_RATIO_TOLERANCE = dict(rel=1e-5, abs=2e-5)


def loss_tolerance(beta: float) -> dict:
    """A sigmoid or hinge loss moves at most beta times as much as the difference of a pair's two log-ratios, each
    within LOG_RATIO_TOLERANCE (on a GPU the hinge at beta 2 was 1e-5 apart, above the same-order LOSS_TOLERANCE)."""
    return dict(rel=LOSS_TOLERANCE["rel"], abs=max(LOSS_TOLERANCE["abs"], 2 * beta * LOG_RATIO_TOLERANCE["abs"]))


@pytest.fixture(scope="module", params=FAMILIES)
def policy(request, tiny_model_folder):
    """The tiny model with a LoRA adapter whose B is random, so that the policy differs from its reference, on
    DEVICE."""
    model, _ = lora_model(tiny_model_folder(request.param), request.param, kernels=False, device=DEVICE)
    return model.eval()


def token_pairs(vocab_size: int) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) ids of unequal lengths, drawn at random (never padding's 0)."""
    generator = torch.Generator().manual_seed(5)

    def draw(count: int) -> list[int]:
        return torch.randint(3, vocab_size, (count,), generator=generator).tolist()

    return [(draw(5), draw(4), draw(7)), (draw(1), draw(6), draw(2)), (draw(9), draw(3), draw(3))]


def ftcli_losses(model, pairs, loss_type: str, label_smoothing: float, beta: float):
    """Per-pair losses and rewards of ftcli's DPO over the pairs as one micro-batch, every answer token trained."""
    examples = [PreferenceExample(prompt, chosen, list(chosen), rejected, list(rejected))
                for prompt, chosen, rejected in pairs]
    preference = {"beta": beta, "loss_type": loss_type, "label_smoothing": label_smoothing}
    settings = recipe("unused", "dpo", preference, batch_size=len(pairs))
    method = PreferenceMethod(settings, PAD_ID, DEVICE, fused=False)
    with torch.no_grad():
        return method.pair_losses(model, examples, method.collate(model, examples))


@pytest.mark.parametrize("loss_type, label_smoothing, beta", VARIANTS)
def test_dpo_losses_and_rewards_equal_trl(policy, loss_type, label_smoothing, beta, tmp_path):
    pairs = token_pairs(policy.config.vocab_size)
    ours = ftcli_losses(policy, pairs, loss_type, label_smoothing, beta)
    trl = trl_dpo_reference(policy, pairs, beta, loss_type, label_smoothing, output_dir=str(tmp_path))

    assert ours.loss.tolist() == pytest.approx(trl.losses.tolist(), **loss_tolerance(beta))
    for reward, trl_reward in ((ours.rewards_chosen, trl.chosen_rewards), (ours.rewards_rejected, trl.rejected_rewards)):
        assert (reward / beta).tolist() == pytest.approx((trl_reward / beta).tolist(), **LOG_RATIO_TOLERANCE)
    # the control: the adapter moves every answer's reward, so a loss of a policy equal to its reference (log 2
    # for sigmoid, 1 for hinge) would not match
    assert min(ours.rewards_chosen.abs().min(), ours.rewards_rejected.abs().min()) > 1e-3
    assert (ours.loss - (math.log(2) if loss_type == "sigmoid" else 1.0)).abs().min() > 1e-4
