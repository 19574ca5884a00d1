"""Preference losses and their LoRA gradients against the published formulas, written out here in plain PyTorch
over full logits of each answer in its own forward, on a tiny model of every family, float32.

The step under test is ftcli's: pairs in two micro-batches, one forward per micro-batch over both answers (the
prompt shared where the model allows it), the answers scored from the hidden states, the loss averaged over the
step's pairs. The reference scores each answer alone and applies each paper's formula as the paper writes it.
"""

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, lora_model
from ftcli.answer_logprobs import collate_pairs, pair_logprobs, shared_prompt_fits
from ftcli.data.templates import IGNORE_INDEX, PreferenceExample
from ftcli.pair_attention import PAIR_ATTENTION
from ftcli.preference import REFERENCE_CACHE, PreferenceMethod
from ftcli.recipe import Recipe
from ftcli_kernels.accuracy import relative_error
from tiny_models import FAMILIES

CPU = torch.device("cpu")
# float32 on both sides: 1e-5 relative, or 5e-6 absolute where a loss cancels (the hinge's 1 - beta h), since the
# summed log-probabilities carry about 1e-6 of float32 rounding either way
LOSS_TOLERANCE = dict(rel=1e-5, abs=5e-6)
GRAD_TOLERANCE = 1e-4  # largest error relative to the largest gradient of each LoRA matrix
VARIANTS = {  # name: (method, preference section)
    "dpo-sigmoid": ("dpo", {"beta": 0.5, "label_smoothing": 0.1}),
    "dpo-ipo": ("dpo", {"beta": 0.5, "loss_type": "ipo"}),
    "dpo-hinge": ("dpo", {"beta": 2.0, "loss_type": "hinge"}),
    "orpo": ("orpo", {"lambda": 0.3}),
    "simpo": ("simpo", {"beta": 2.0, "gamma": 0.4, "label_smoothing": 0.05}),
}


def make_pairs(seed: int, count: int = 3, longest_answer: int = 7) -> list[PreferenceExample]:
    """Random pairs of varied lengths; one answer's last token is not trained (as a template's newline after its
    end-of-turn marker)."""
    generator = torch.Generator().manual_seed(seed)

    def ids(low, high):
        return torch.randint(3, 300, (int(torch.randint(low, high + 1, (), generator=generator)),),
                             generator=generator).tolist()

    pairs = []
    for index in range(count):
        prompt, chosen, rejected = ids(2, 6), ids(2, longest_answer), ids(2, longest_answer)
        chosen_labels = chosen[:-1] + [IGNORE_INDEX] if index == 0 else list(chosen)
        pairs.append(PreferenceExample(prompt, chosen, chosen_labels, rejected, list(rejected), origin=f"row {index}"))
    return pairs


def recipe(folder, method: str, preference: dict, **train) -> Recipe:
    return Recipe(model={"name": str(folder), "dtype": "float32"}, data={"path": "pairs.jsonl", "format": "preference"},
                  train={"method": method, "batch_size": 2} | train, preference=preference)


def answer_logprob(model, prompt: list[int], answer: list[int], labels: list[int]) -> torch.Tensor:
    """log p(answer | prompt) over its trained tokens, from the full logits of one forward over prompt + answer."""
    logits = model(input_ids=torch.tensor([prompt + answer])).logits[0].float()
    logprobs = logits.log_softmax(-1)
    return sum(logprobs[len(prompt) + j - 1, label] for j, label in enumerate(labels) if label != IGNORE_INDEX)


def trained(labels: list[int]) -> int:
    return sum(label != IGNORE_INDEX for label in labels)


def formula_loss(method: str, settings: dict, model, pair: PreferenceExample) -> torch.Tensor:
    """The paper's loss of one pair."""
    chosen = answer_logprob(model, pair.prompt_ids, pair.chosen_ids, pair.chosen_labels)
    rejected = answer_logprob(model, pair.prompt_ids, pair.rejected_ids, pair.rejected_labels)
    beta, smoothing = settings.get("beta"), settings.get("label_smoothing", 0.0)
    if method == "dpo":
        with torch.no_grad(), model.disable_adapter():
            reference_chosen = answer_logprob(model, pair.prompt_ids, pair.chosen_ids, pair.chosen_labels)
            reference_rejected = answer_logprob(model, pair.prompt_ids, pair.rejected_ids, pair.rejected_labels)
        h = (chosen - reference_chosen) - (rejected - reference_rejected)
        kind = settings.get("loss_type", "sigmoid")
        if kind == "sigmoid":
            return -(1 - smoothing) * F.logsigmoid(beta * h) - smoothing * F.logsigmoid(-beta * h)
        if kind == "ipo":
            return (h - 1 / (2 * beta)) ** 2
        return torch.clamp(1 - beta * h, min=0)
    chosen_mean = chosen / trained(pair.chosen_labels)
    rejected_mean = rejected / trained(pair.rejected_labels)
    if method == "orpo":
        odds = lambda mean: torch.exp(mean) / (1 - torch.exp(mean))  # noqa: E731
        return -chosen_mean - settings["lambda"] * F.logsigmoid(torch.log(odds(chosen_mean) / odds(rejected_mean)))
    margin = beta * chosen_mean - beta * rejected_mean - settings["gamma"]
    return -(1 - smoothing) * F.logsigmoid(margin) - smoothing * F.logsigmoid(-margin)


def lora_gradients(model) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def assert_same_gradients(grads: dict, want: dict) -> None:
    assert grads.keys() == want.keys() and grads
    for name, grad in want.items():
        assert grad.abs().max() > 0, name  # the control: every LoRA matrix takes part
        assert relative_error(grads[name], grad) < GRAD_TOLERANCE, name


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_step_loss_and_gradients_equal_the_formula(family, variant, tiny_model_folder):
    method, settings = VARIANTS[variant]
    model, _ = lora_model(tiny_model_folder(family), family, kernels=False)
    pairs = make_pairs(seed=len(family))
    step = PreferenceMethod(recipe(tiny_model_folder(family), method, settings), 0, CPU, fused=False)

    result = step.accumulate_gradients(model, [pairs[:2], pairs[2:]])
    grads = lora_gradients(model)
    want = torch.stack([formula_loss(method, settings, model, pair) for pair in pairs]).mean()
    want.backward()

    assert result.loss == pytest.approx(float(want), **LOSS_TOLERANCE)
    assert_same_gradients(grads, lora_gradients(model))
    assert result.tokens == sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)


def test_dpo_rewards_are_beta_times_the_log_ratios(tiny_model_folder):
    model, _ = lora_model(tiny_model_folder("llama"), "llama", kernels=False)
    pairs = make_pairs(seed=9, count=4)
    step = PreferenceMethod(recipe(tiny_model_folder("llama"), "dpo", {"beta": 0.25}), 0, CPU, fused=False)
    result = step.accumulate_gradients(model, [pairs])

    with torch.no_grad():
        def ratio(pair, side):
            ids, labels = (pair.chosen_ids, pair.chosen_labels) if side == "chosen" else (pair.rejected_ids, pair.rejected_labels)
            policy = answer_logprob(model, pair.prompt_ids, ids, labels)
            with model.disable_adapter():
                return float(policy - answer_logprob(model, pair.prompt_ids, ids, labels))
        chosen = torch.tensor([0.25 * ratio(pair, "chosen") for pair in pairs])
        rejected = torch.tensor([0.25 * ratio(pair, "rejected") for pair in pairs])
    assert result.metrics["rewards_chosen"] == pytest.approx(float(chosen.mean()), rel=1e-4)
    assert result.metrics["rewards_rejected"] == pytest.approx(float(rejected.mean()), rel=1e-4)
    assert result.metrics["reward_margin"] == pytest.approx(float((chosen - rejected).mean()), rel=1e-4)
    assert result.metrics["reward_accuracy"] == float((chosen > rejected).float().mean())
    assert 0 < result.metrics["reward_accuracy"] < 1  # the control: these random pairs go both ways


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text", "phi3", "gemma2"])
def test_shared_prompt_row_scores_as_separate_rows(family, tiny_model_folder):
    """One row of prompt, chosen and rejected (the rejected answer blind to the chosen) gives the log-probabilities
    and gradients of two rows; rows short enough for the tiny models' sliding windows, so every family can share.
    Under SDPA the row's attention is split in two causal ones (ftcli_pairs); Gemma 2's eager attention takes the
    row's 4-D mask."""
    model, _ = lora_model(tiny_model_folder(family), family, kernels=False)
    pairs = make_pairs(seed=5, longest_answer=5)
    assert shared_prompt_fits(model.config, max(len(p.prompt_ids + p.chosen_ids + p.rejected_ids) for p in pairs))
    results = {}
    for shared in (True, False):
        scores = pair_logprobs(model, collate_pairs(pairs, 0, CPU, shared, torch.float32), fused=False)
        (scores.chosen.sum() - 2 * scores.rejected.sum()).backward()
        results[shared] = (scores.chosen.detach(), scores.rejected.detach(), lora_gradients(model))
    assert model.config._attn_implementation == ("eager" if family == "gemma2" else PAIR_ATTENTION)
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-5, atol=1e-5)
    assert_same_gradients(results[True][2], results[False][2])


def test_sliding_window_shorter_than_the_row_gets_separate_rows(tiny_model_folder):
    model, _ = lora_model(tiny_model_folder("mistral"), "mistral", kernels=False)
    window = model.config.sliding_window
    assert shared_prompt_fits(model.config, window) and not shared_prompt_fits(model.config, window + 1)
    model.config._attn_implementation = "flash_attention_2"
    assert not shared_prompt_fits(model.config, 4)


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: the head's soft-capping
def test_fused_scoring_with_kernels_equals_unfused(family, tiny_model_folder):
    """kernels: true (the patched model, answers scored through the chunked kernel) against plain peft with full
    logits: the same DPO loss and LoRA gradients."""
    folder = tiny_model_folder(family)
    pairs = make_pairs(seed=11)
    results = []
    for kernels in (True, False):
        model, swapped = lora_model(folder, family, kernels=kernels, device=DEVICE)
        assert bool(swapped) == kernels
        step = PreferenceMethod(recipe(folder, "dpo", {"beta": 0.5}), 0, DEVICE, fused=kernels)
        results.append((step.accumulate_gradients(model, [pairs]).loss, lora_gradients(model)))
    (loss, grads), (want_loss, want_grads) = results
    assert loss == pytest.approx(want_loss, rel=1e-5)
    assert_same_gradients(grads, want_grads)


def test_precomputed_reference_is_cached_and_gives_the_same_step(tiny_model_folder, tmp_path):
    folder = tiny_model_folder("llama")
    model, _ = lora_model(folder, "llama", kernels=False)
    pairs, held_out = make_pairs(seed=3), make_pairs(seed=4, count=2)
    live = PreferenceMethod(recipe(folder, "dpo", {}), 0, CPU, fused=False)
    want = live.accumulate_gradients(model, [pairs])
    want_grads = lora_gradients(model)

    cached = PreferenceMethod(recipe(folder, "dpo", {"precompute_reference": True}), 0, CPU, fused=False)
    cached.prepare(model, pairs, held_out, tmp_path)
    assert (tmp_path / REFERENCE_CACHE).is_file()
    assert len(cached.cached_reference) == len(pairs) + len(held_out)
    result = cached.accumulate_gradients(model, [pairs])
    assert result.loss == pytest.approx(want.loss, rel=1e-6)
    assert_same_gradients(lora_gradients(model), want_grads)

    with torch.no_grad():  # a resumed run reads the cache instead of computing it: change the model to tell
        model.base_model.model.lm_head.weight.mul_(2)
    reread = PreferenceMethod(recipe(folder, "dpo", {"precompute_reference": True}), 0, CPU, fused=False)
    reread.prepare(model, pairs, held_out, tmp_path)
    assert reread.cached_reference.keys() == cached.cached_reference.keys()
    assert list(reread.cached_reference.values()) == list(cached.cached_reference.values())
    other = PreferenceMethod(recipe(folder, "dpo", {"precompute_reference": True}), 0, CPU, fused=False)
    other.prepare(model, pairs[:2], held_out, tmp_path)  # other pairs: computed again, with the changed head
    assert list(other.cached_reference.values())[0] != list(cached.cached_reference.values())[0]


def test_evaluation_reports_the_mean_pair_loss_and_rewards(tiny_model_folder):
    folder = tiny_model_folder("llama")
    model, _ = lora_model(folder, "llama", kernels=False)
    pairs = make_pairs(seed=6, count=3)
    step = PreferenceMethod(recipe(folder, "simpo", {}), 0, CPU, fused=False)
    loss, metrics, diverged = step.evaluate(model, pairs)
    with torch.no_grad():
        want = torch.stack([formula_loss("simpo", {"beta": 2.0, "gamma": 0.5}, model, pair) for pair in pairs]).mean()
    assert loss == pytest.approx(float(want), rel=1e-5)
    assert set(metrics) == {"rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy"}
    assert diverged == [] and model.training
