"""DPO on the real fixture model: recipes/smollm2-dpo-cpu.yaml's run teaches SmolLM2-135M-Instruct to open its
answers with "Arr, matey!", a trait the base model never shows, and the trained model prefers the chosen answers
of pairs it never saw.

The run goes through the CLI; everything measured afterwards uses plain transformers and peft, not ftcli's code
(ftcli.data only turns the held-out rows into the token ids the preference data trains on).
"""

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ROOT, run_cli
from ftcli.data import prepare_data
from ftcli.data.templates import PreferenceExample
from ftcli.recipe import DataSettings, load_recipe
from test_preference_loss import answer_logprob

RECIPE = ROOT / "recipes" / "smollm2-dpo-cpu.yaml"
HELDOUT = ROOT / "recipes" / "data" / "pirate-preferences-heldout.jsonl"
TRAIT = "Arr"
# Every chosen answer opens with "Arr, matey!". Greedy answers switch to it within a step or two (on 2 CPU cores, at
# the recipe's learning rate: none at step 4, 48% at step 5, all at steps 6 and 8), so 80% after 8 steps shows the
# trait learnt with room for another machine's rounding; the base model's 0% shows it was not there before
TRAIT_SHARE = 0.8
REWARD_ACCURACY = 0.9  # held-out pairs: the chosen answer's reward above the rejected one's
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def dpo_output(smollm2_folder, tmp_path_factory) -> Path:
    """recipes/smollm2-dpo-cpu.yaml on the fixture, run once for the module."""
    out = tmp_path_factory.mktemp("dpo") / "smollm2-dpo"
    result = run_cli("train", RECIPE, "--set", f"model.name={smollm2_folder}",
                     "--set", f"data.path={ROOT / 'recipes' / 'data' / 'pirate-preferences.jsonl'}",
                     "--output", out, "--json")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def models(smollm2_folder, dpo_output):
    """(base, trained): the fixture as it is, and the fixture with the run's adapter, in float32."""
    base = AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32).eval()
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32),
                                        dpo_output).eval()
    return base, trained


def heldout_prompts() -> list[list[dict]]:
    """Each held-out row's prompt as messages: a string is one user turn, a list keeps its system turn."""
    prompts = [json.loads(line)["prompt"] for line in HELDOUT.read_text().splitlines() if line.strip()]
    return [prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}] for prompt in prompts]


def greedy_answer(model, tokenizer, messages: list[dict]) -> str:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    with torch.no_grad():
        reply = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)[0, ids.shape[1]:]
    return tokenizer.decode(reply, skip_special_tokens=True).strip()


def heldout_pairs(tokenizer) -> list[PreferenceExample]:
    """The held-out rows tokenized as the preference data format tokenizes training pairs."""
    settings = DataSettings(path=str(HELDOUT), format="preference", shuffle=False)
    return prepare_data(settings, tokenizer, load_recipe(RECIPE).model.max_seq_length, seed=0).train


@pytest.mark.slow
def test_dpo_teaches_the_pirate_greeting_that_the_base_model_lacks(models, smollm2_folder):
    base, trained = models
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    prompts = heldout_prompts()
    trained_answers = [greedy_answer(trained, tokenizer, messages) for messages in prompts]
    base_answers = [greedy_answer(base, tokenizer, messages) for messages in prompts]
    share = sum(answer.startswith(TRAIT) for answer in trained_answers) / len(prompts)
    assert share >= TRAIT_SHARE, trained_answers
    assert not any(answer.startswith(TRAIT) for answer in base_answers), base_answers


@pytest.mark.slow
def test_the_trained_model_prefers_the_chosen_answers_of_heldout_pairs(models, smollm2_folder):
    """DPO's implicit reward, beta (log p_trained - log p_base), of each answer; the chosen one's must be higher."""
    base, trained = models
    beta = load_recipe(RECIPE).beta()
    pairs = heldout_pairs(AutoTokenizer.from_pretrained(smollm2_folder))
    assert len(pairs) == len(heldout_prompts())

    @torch.no_grad()
    def reward(ids: list[int], labels: list[int], prompt: list[int]) -> float:
        return beta * float(answer_logprob(trained, prompt, ids, labels) - answer_logprob(base, prompt, ids, labels))

    wins = [reward(p.chosen_ids, p.chosen_labels, p.prompt_ids) > reward(p.rejected_ids, p.rejected_labels,
                                                                          p.prompt_ids) for p in pairs]
    assert sum(wins) / len(pairs) >= REWARD_ACCURACY, wins


@pytest.mark.slow
def test_the_run_metrics_show_rewards_learnt(dpo_output):
    rows = [json.loads(line) for line in (dpo_output / "metrics.jsonl").read_text().splitlines()]
    train_rows = [row for row in rows if "rewards_chosen" in row]
    assert train_rows[-1]["reward_accuracy"] >= REWARD_ACCURACY
    assert train_rows[-1]["rewards_chosen"] > train_rows[0]["rewards_chosen"]
