"""Preference pairs: each row layout split into a prompt and two answers, their labels, truncation, bad rows, the
recipe checks and the preview."""

import json

import pytest
from transformers import AutoTokenizer

from conftest import ROOT, assert_clean_failure, run_cli, styled, trained_text, write_jsonl, write_recipe
from ftcli.data import prepare_data
from ftcli.data.formats import PreferencePair, check_columns, to_pair
from ftcli.data.preview import REJECTED_STYLE, TRAINED_STYLE, render_pair
from ftcli.data.templates import (BUILTIN_TEMPLATES, IGNORE_INDEX, generation_prompt_ids, tokenize_conversation,
                                  tokenize_pair, use_template)
from ftcli.errors import RecipeError
from ftcli.recipe import DataSettings
from test_templates import CONVERSATION, TRAINED
from tiny_models import build_tiny_tokenizer

QUESTION = "What is the capital of France?"
CHOSEN = "Arr, matey! The capital of France be Paris."
REJECTED = "The capital of France is Paris."
SYSTEM = {"role": "system", "content": "Answer in one sentence."}
CONTEXT = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! Ask away."}]
HH_CONTEXT = "\n\nHuman: Hi!\n\nAssistant: Hello! Ask away."
END = "<|im_end|>"  # SmolLM2's end of a turn, and its EOS
PIRATE = "Arr, matey! "
PIRATE_FILES = {"train": ROOT / "recipes" / "data" / "pirate-preferences.jsonl",
                "heldout": ROOT / "recipes" / "data" / "pirate-preferences-heldout.jsonl"}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


# Each layout a row may have, and the prompt it gives; the answers are CHOSEN and REJECTED in every one
LAYOUTS = {
    "strings": ({"prompt": QUESTION, "chosen": CHOSEN, "rejected": REJECTED}, [user(QUESTION)]),
    "message lists": ({"prompt": [SYSTEM, *CONTEXT, user(QUESTION)], "chosen": [assistant(CHOSEN)],
                       "rejected": [assistant(REJECTED)]}, [SYSTEM, *CONTEXT, user(QUESTION)]),
    "UltraFeedback": ({"prompt": QUESTION, "chosen": [user(QUESTION), assistant(CHOSEN)],
                       "rejected": [user(QUESTION), assistant(REJECTED)]}, [user(QUESTION)]),
    "HH lists": ({"chosen": [SYSTEM, *CONTEXT, user(QUESTION), assistant(CHOSEN)],
                  "rejected": [SYSTEM, *CONTEXT, user(QUESTION), assistant(REJECTED)]},
                 [SYSTEM, *CONTEXT, user(QUESTION)]),
    "HH strings": ({"chosen": f"{HH_CONTEXT}\n\nHuman: {QUESTION}\n\nAssistant: {CHOSEN}",
                    "rejected": f"{HH_CONTEXT}\n\nHuman: {QUESTION}\n\nAssistant: {REJECTED}"},
                   [*CONTEXT, user(QUESTION)]),
}
GOOD_ROW = LAYOUTS["strings"][0]


@pytest.fixture(scope="module")
def tokenizer(smollm2_folder):
    return AutoTokenizer.from_pretrained(smollm2_folder)


def pairs_recipe(tmp_path, model, rows: list[dict], **data) -> tuple:
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    recipe = write_recipe(tmp_path / "r.yaml", model, path, tmp_path / "out",
                          data={"format": "preference", "shuffle": False, **data}, train={"method": "dpo"})
    return recipe, path


def dry_run_summary(recipe, *extra: str) -> dict:
    result = run_cli("train", recipe, "--dry-run", "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_layout_gives_the_prompt_and_both_answers(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", [row for row, _ in LAYOUTS.values()])
    data = prepare_data(DataSettings(path=str(path), format="preference", shuffle=False), tokenizer, 512, seed=0)
    assert [pair.origin for pair in data.train] == [f"{path} row {n}" for n in range(1, len(LAYOUTS) + 1)]
    for pair, (name, (_, prompt)) in zip(data.train, LAYOUTS.items()):
        rendered_prompt = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        assert tokenizer.decode(pair.prompt_ids) == rendered_prompt, name
        assert pair.prompt_ids == generation_prompt_ids(tokenizer, prompt), name
        assert tokenizer.decode(pair.chosen_ids) == f"{CHOSEN}{END}\n", name
        assert tokenizer.decode(pair.rejected_ids) == f"{REJECTED}{END}\n", name
        assert len(pair.chosen_labels) == len(pair.chosen_ids) and len(pair.rejected_labels) == len(pair.rejected_ids)
        assert trained_text(tokenizer, pair.chosen_ids, pair.chosen_labels) == f"{CHOSEN}{END}", name
        assert trained_text(tokenizer, pair.rejected_ids, pair.rejected_labels) == f"{REJECTED}{END}", name
        assert pair.chosen_labels[-1] == pair.rejected_labels[-1] == IGNORE_INDEX  # the template's "\n" after the end
        assert not pair.truncated


def test_an_answer_of_several_assistant_messages_is_trained_in_each(tokenizer):
    pair = to_pair({"prompt": QUESTION, "chosen": [assistant("Arr!"), assistant("Paris, matey.")],
                    "rejected": "Paris."}, "pairs.jsonl row 1")
    assert pair.chosen == [assistant("Arr!"), assistant("Paris, matey.")]
    example = tokenize_pair(tokenizer, pair, 512, "pairs.jsonl row 1")
    assert tokenizer.decode(example.chosen_ids) == f"Arr!{END}\n<|im_start|>assistant\nParis, matey.{END}\n"
    assert trained_text(tokenizer, example.chosen_ids, example.chosen_labels) == f"Arr!{END}Paris, matey.{END}"


def test_columns_say_where_the_fields_are(tmp_path, tokenizer):
    row = {"question": QUESTION, "response_j": CHOSEN, "response_k": REJECTED}
    columns = {"prompt": "question", "chosen": "response_j", "rejected": "response_k"}
    path = write_jsonl(tmp_path / "pairs.jsonl", [row])
    mapped = prepare_data(DataSettings(path=str(path), format="preference", columns=columns), tokenizer, 512, seed=0)
    plain = tokenize_pair(tokenizer, to_pair(GOOD_ROW, "row"), 512, "row")
    assert (mapped.train[0].prompt_ids, mapped.train[0].chosen_ids, mapped.train[0].rejected_labels) == (
        plain.prompt_ids, plain.chosen_ids, plain.rejected_labels)
    with pytest.raises(RecipeError, match="'answer', which is not a field of format 'preference'.*prompt, chosen, "
                                          "rejected"):
        check_columns("preference", {"answer": "response_j"}, None)


@pytest.mark.parametrize("template", sorted(BUILTIN_TEMPLATES))
def test_each_template_splits_where_the_answer_starts(template):
    """The prompt is what generation starts from, each answer is trained as SFT trains it (the whitespace that the
    template writes after its end marker aside), and prompt and answer are SFT's rendering of the conversation: a
    prompt's earlier answers too, with EOS after their end marker where that is not EOS, as SFT trains them."""
    tokenizer = build_tiny_tokenizer()
    use_template(tokenizer, template)
    for turns, answer_index in ((3, 0), (5, 1)):
        prompt, answer = CONVERSATION[:turns - 1], CONVERSATION[turns - 1]
        example = tokenize_pair(tokenizer, PreferencePair(prompt, [answer], [assistant("I am Bob.")]), 1024, "row")
        trained = TRAINED[template][answer_index].rstrip()
        assert trained_text(tokenizer, example.chosen_ids, example.chosen_labels) == trained
        sft = tokenize_conversation(tokenizer, CONVERSATION[:turns], responses_only=True, max_length=1024)
        assert example.prompt_ids + example.chosen_ids == sft.input_ids
        if answer_index == 0:  # no earlier answer in the prompt
            assert example.prompt_ids == generation_prompt_ids(tokenizer, prompt)


def test_stats_count_the_prompt_once_and_both_answers(tmp_path, tokenizer):
    pair = tokenize_pair(tokenizer, to_pair(GOOD_ROW, "row"), 512, "row")
    prompt, chosen, rejected = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD_ROW])
    settings = DataSettings(path=str(path), format="preference")
    stats = prepare_data(settings, tokenizer, 512, seed=0).stats
    assert (stats.examples, stats.truncated, stats.tokens, stats.longest) == (1, 0, prompt + chosen + rejected,
                                                                              prompt + chosen + rejected)
    assert stats.target_tokens == chosen - 1 + rejected - 1  # all but the "\n" after each answer's end

    cut = prepare_data(settings, tokenizer, prompt + 3, seed=0)
    example = cut.train[0]
    assert example.truncated and example.prompt_ids == pair.prompt_ids
    assert (example.chosen_ids, example.rejected_ids) == (pair.chosen_ids[:3], pair.rejected_ids[:3])
    assert (cut.stats.truncated, cut.stats.tokens, cut.stats.target_tokens, cut.stats.lengths) == (
        1, prompt + 6, 6, [prompt + 6])


def test_an_answer_that_truncation_leaves_untrained_is_dropped(tmp_path):
    """A token that starts in the prompt and ends in the answer (' the' of "Say t" + "he") is not trained, and it
    differs between the answers, so the prompt stops before it; cut after it, the chosen answer has no target."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    rows = [{"prompt": "Say t", "chosen": "he", "rejected": "m"}, {"prompt": "Say", "chosen": "yes", "rejected": "no"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    data = prepare_data(DataSettings(path=str(path), format="preference", shuffle=False), tokenizer, 2, seed=0)
    assert [pair.origin for pair in data.train] == [f"{path} row 2"]
    assert (data.stats.dropped_no_target, data.stats.truncated) == (1, 1)


BAD_ROWS = [
    ({"prompt": QUESTION, "rejected": REJECTED}, ["format 'preference' needs the column(s) chosen", "Fix the row"]),
    ({"prompt": QUESTION, "chosen": CHOSEN}, ["needs the column(s) rejected", "map your column names"]),
    ({"chosen": CHOSEN, "rejected": REJECTED}, ["needs the column(s) prompt, but this row has only: chosen, rejected"]),
    ({"prompt": QUESTION, "chosen": "   ", "rejected": REJECTED}, ["needs the column(s) chosen"]),
    ({"prompt": QUESTION, "chosen": [assistant(" ")], "rejected": REJECTED},
     ["the answer in column 'chosen' is empty", "Write the answer, or remove the row"]),
    ({"prompt": QUESTION, "chosen": REJECTED, "rejected": f" {REJECTED} "},
     ["the chosen and the rejected answer are the same", "Fix one of them, or remove the row"]),
    ({"prompt": QUESTION, "chosen": CHOSEN, "rejected": [user("Why?"), assistant(REJECTED)]},
     ["message 1 of the answer in column 'rejected' is a user message", "Move the context into the prompt"]),
    ({"prompt": [user(QUESTION), assistant("Hm.")], "chosen": CHOSEN, "rejected": REJECTED},
     ["the prompt (column 'prompt') ends with the assistant's message", "must end with the user's message"]),
    ({"prompt": [user(QUESTION), SYSTEM], "chosen": CHOSEN, "rejected": REJECTED},
     ["system message after its first message", "Move it first"]),
    ({"chosen": [user("Hi!"), assistant(CHOSEN)], "rejected": [user("Hello!"), assistant(REJECTED)]},
     ["differ before their last assistant turn", "Give the row a prompt"]),
    ({"prompt": "Tell me about Paris. " * 40, "chosen": CHOSEN, "rejected": REJECTED},
     ["the prompt is", "tokens, which leaves no room for an answer within model.max_seq_length 128",
      "Shorten the prompt, or raise model.max_seq_length"]),
]


@pytest.mark.parametrize("row,fragments", BAD_ROWS)
def test_a_bad_row_stops_train_naming_its_file_row_and_fix(tmp_path, smollm2_folder, row, fragments):
    recipe, path = pairs_recipe(tmp_path, smollm2_folder, [GOOD_ROW, row])
    result = run_cli("train", recipe)
    assert_clean_failure(result, 2, f"{path} row 2: ", *fragments, "data.skip_invalid: true")


def test_skip_invalid_counts_every_bad_row(tmp_path, smollm2_folder):
    recipe, path = pairs_recipe(tmp_path, smollm2_folder, [GOOD_ROW] + [row for row, _ in BAD_ROWS], skip_invalid=True)
    summary = dry_run_summary(recipe)
    assert (summary["rows"], summary["skipped_invalid"], summary["train_examples"]) == (1 + len(BAD_ROWS),
                                                                                         len(BAD_ROWS), 1)


@pytest.mark.parametrize("field,value", [("packing", True), ("conversation_extension", 2)])
def test_packing_and_conversation_extension_are_refused(tmp_path, smollm2_folder, field, value):
    recipe, _ = pairs_recipe(tmp_path, smollm2_folder, [GOOD_ROW], **{field: value})
    default = DataSettings.model_fields[field].default
    assert_clean_failure(run_cli("train", recipe), 2, f"{recipe} line",
                         f"data.{field} does not apply to data.format preference",
                         f"set data.{field}: {json.dumps(default)}")


def test_dry_run_reports_pairs(tmp_path, smollm2_folder):
    recipe, _ = pairs_recipe(tmp_path, smollm2_folder, [GOOD_ROW, LAYOUTS["HH strings"][0]], eval_fraction=0.5)
    summary = dry_run_summary(recipe)
    assert (summary["rows"], summary["train_examples"], summary["eval_examples"]) == (2, 1, 1)
    assert summary["target_tokens"] < summary["tokens"] and summary["longest"] > 0


def test_preview_shows_the_prompt_then_both_answers_labelled(tmp_path, smollm2_folder, tokenizer):
    pair = tokenize_pair(tokenizer, to_pair(GOOD_ROW, "row"), 512, "row")
    text = render_pair(tokenizer, pair)
    assert styled(text, TRAINED_STYLE) == f"{CHOSEN}{END}" and styled(text, REJECTED_STYLE) == f"{REJECTED}{END}"
    prompt = tokenizer.decode(pair.prompt_ids)
    assert text.plain == f"{prompt}[chosen answer]\n{CHOSEN}{END}\n[rejected answer]\n{REJECTED}{END}\n"

    recipe, path = pairs_recipe(tmp_path, smollm2_folder, [GOOD_ROW, LAYOUTS["HH lists"][0]])
    result = run_cli("data", "preview", recipe, "-n", "1")
    assert result.exit_code == 0, result.output
    assert f"{path} row 1" in result.output and f"{path} row 2" not in result.output
    assert f"[chosen answer]\n{CHOSEN}{END}\n[rejected answer]\n{REJECTED}{END}" in result.output
    assert "token lengths (per pair: its prompt once and both answers, after truncation)" in result.output
    assert "2 rows -> 2 training / 0 eval examples; 0 truncated" in result.output


def test_the_pirate_pairs_load_and_their_held_out_prompts_are_new(tokenizer):
    questions = {}
    for name, path in PIRATE_FILES.items():
        data = prepare_data(DataSettings(path=str(path), format="preference"), tokenizer, 256, seed=0)
        assert (data.stats.skipped_invalid, data.stats.truncated, data.stats.dropped_no_target) == (0, 0, 0)
        for pair in data.train:
            chosen = trained_text(tokenizer, pair.chosen_ids, pair.chosen_labels)
            rejected = trained_text(tokenizer, pair.rejected_ids, pair.rejected_labels)
            assert chosen.startswith(PIRATE) and not rejected.startswith(PIRATE) and "matey" not in rejected
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        questions[name] = {row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][-1]["content"]
                           for row in rows}
        assert len(questions[name]) == len(rows) == len(data.train)
    assert (len(questions["train"]), len(questions["heldout"])) == (240, 40)
    assert not questions["train"] & questions["heldout"]
