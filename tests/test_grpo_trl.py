"""ftcli's GRPO loss and LoRA gradients equal TRL's GRPOTrainer's (tests/trl_reference.py) on the same tiny model,
adapter, completions and rewards, float32, both on conftest.DEVICE (TRL's fused LM head is compiled Triton on a GPU,
which takes CUDA tensors only): GRPO and Dr. GRPO, with and without the KL term.

ftcli's side is its own step: two prompts in one micro-batch, their completions handed out by a fixed engine,
rewarded by the built-in length reward; TRL gets the same completions and the advantages ftcli's rewards give
(TRL's own advantage code is the same formula, tests/test_grpo_loss.py holds ours to it). TRL's KL term is taken
without its default ratio factor (use_bias_correction_kl), which changes the gradient but not the value; ftcli
follows the published formula.
"""

import pytest
import torch

from conftest import DEVICE, lora_model
from ftcli.grpo_losses import group_advantages
from test_grpo_loss import (GENERATIONS, LOSS_TOLERANCE, MAX_COMPLETION, assert_same_gradients, grpo_method,
                            length_reward, lora_gradients, make_rollout, recipe)
from trl_reference import trl_grpo_loss

VARIANTS = {"grpo": {"loss_type": "grpo"}, "grpo-kl": {"loss_type": "grpo", "beta": 0.2},
            "dr_grpo-kl": {"loss_type": "dr_grpo", "beta": 0.05, "scale_rewards": False}}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_loss_and_gradients_equal_trl(family, variant, tiny_model_folder, tmp_path):
    settings = VARIANTS[variant]
    model, _ = lora_model(tiny_model_folder(family), family, kernels=False, device=DEVICE)
    examples, completions = make_rollout(seed=7)
    method = grpo_method(model, recipe(tiny_model_folder(family), settings), completions)
    ours = method.accumulate_gradients(model, [examples]).loss
    our_grads = lora_gradients(model)

    rewards = torch.tensor([length_reward(completion) for completion in completions])
    advantages = group_advantages(rewards, GENERATIONS, settings.get("scale_rewards", True))
    prompts = [example.prompt_ids for example in examples for _ in range(GENERATIONS)]
    theirs = trl_grpo_loss(model, prompts, completions, advantages, settings.get("beta", 0.0), 0.2,
                           settings["loss_type"], MAX_COMPLETION, pad_id=0, output_dir=str(tmp_path))
    theirs.backward()

    assert ours == pytest.approx(float(theirs), **LOSS_TOLERANCE)
    assert_same_gradients(our_grads, lora_gradients(model))
