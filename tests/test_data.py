"""Rows to conversations to token ids: formats, loss masks, templates and their errors."""

import json

import pytest
from transformers import AutoTokenizer

from conftest import REFUSES_SYSTEM, trained_text, write_jsonl
from ftcli.data import prepare_data
from ftcli.data.formats import check_columns, extend_conversations, to_conversation
from ftcli.data.sources import read_rows
from ftcli.data.templates import tokenize_conversation, tokenize_text, use_template
from ftcli.errors import DataError, RecipeError
from ftcli.recipe import DataSettings
from tiny_models import build_tiny_tokenizer

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Your name?"},
                {"role": "assistant", "content": "I am Nimbus."}]


@pytest.fixture(scope="module")
def tokenizer(smollm2_folder):
    return AutoTokenizer.from_pretrained(smollm2_folder)


def test_formats_become_the_same_conversation():
    expected = [{"role": "user", "content": "Add 2 and 3.\n\nBe exact."}, {"role": "assistant", "content": "5"}]
    alpaca = {"instruction": "Add 2 and 3.", "input": "Be exact.", "output": "5"}
    sharegpt = {"conversations": [{"from": "human", "value": "Add 2 and 3.\n\nBe exact."}, {"from": "gpt", "value": "5"}]}
    messages = {"messages": expected}
    for row, data_format in [(alpaca, "alpaca"), (sharegpt, "sharegpt"), (messages, "messages")]:
        assert to_conversation(row, "f.jsonl row 1", data_format) == expected
    assert to_conversation({"instruction": "Add.", "input": "", "output": "5"}, "f", "alpaca")[0]["content"] == "Add."
    assert to_conversation({"text": "raw words"}, "f", "text") == "raw words"


@pytest.mark.parametrize("row,data_format,fragments", [
    ({"instruction": "x"}, "alpaca", ["f.jsonl row 4", "output", "instruction"]),
    ({"conversations": [{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}]}, "sharegpt", ["row 4", "'robot'"]),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "messages", ["row 4", "no assistant turn"]),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}, "messages", ["row 4, turn 1", "'content'"]),
    ({"messages": "not a list"}, "messages", ["row 4", "non-empty list"]),
])
def test_bad_rows_name_the_row_and_the_problem(row, data_format, fragments):
    with pytest.raises(DataError) as error:
        to_conversation(row, "f.jsonl row 4", data_format)
    for fragment in fragments:
        assert fragment in error.value.message


def test_only_assistant_turns_and_their_end_token_are_trained(tokenizer):
    example = tokenize_conversation(tokenizer, CONVERSATION, responses_only=True, max_length=512)
    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert trained_text(tokenizer, example.input_ids, example.labels) == "Hello! How can I help?<|im_end|>\nI am Nimbus.<|im_end|>\n"


def test_without_responses_only_every_token_is_trained(tokenizer):
    example = tokenize_conversation(tokenizer, CONVERSATION, responses_only=False, max_length=512)
    assert example.labels == example.input_ids


def test_truncation_is_counted(tokenizer):
    example = tokenize_conversation(tokenizer, CONVERSATION, responses_only=True, max_length=10)
    assert example.truncated and len(example.input_ids) == len(example.labels) == 10


def test_builtin_alpaca_template_ends_each_response_with_eos(tokenizer):
    alpaca_tokenizer = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    use_template(alpaca_tokenizer, "alpaca")
    example = tokenize_conversation(alpaca_tokenizer, CONVERSATION[1:3], responses_only=True, max_length=512)
    assert trained_text(alpaca_tokenizer, example.input_ids, example.labels) == "Hello! How can I help?<|im_end|>\n\n"
    assert "### Instruction:\nHi there" in alpaca_tokenizer.decode(example.input_ids)


def test_template_errors(tokenizer):
    with pytest.raises(RecipeError, match="not a known template.*alpaca, chatml, llama-2"):
        use_template(tokenizer, "llama-9")
    bare = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    bare.chat_template = None
    with pytest.raises(RecipeError, match="has no chat template"):
        use_template(bare, "auto")


def test_raw_text_is_chunked_with_eos(tokenizer):
    chunks = tokenize_text(tokenizer, "one two three four five six seven", max_length=3)
    ids = [token for chunk in chunks for token in chunk.input_ids]
    assert ids[-1] == tokenizer.eos_token_id and all(len(chunk.input_ids) <= 3 for chunk in chunks)
    assert all(chunk.labels == chunk.input_ids for chunk in chunks)


def test_prepare_data_splits_eval_rows_by_seed(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(10)]
    settings = DataSettings(path=str(write_jsonl(tmp_path / "d.jsonl", rows)), eval_fraction=0.2)
    first = prepare_data(settings, tokenizer, 128, seed=1)
    assert (len(first.train), len(first.eval), first.stats.rows) == (8, 2, 10)
    again = prepare_data(settings, tokenizer, 128, seed=1)
    assert [e.input_ids for e in again.eval] == [e.input_ids for e in first.eval]
    other = prepare_data(settings, tokenizer, 128, seed=2)
    assert [e.input_ids for e in other.eval] != [e.input_ids for e in first.eval]


@pytest.mark.parametrize("suffix,content,data_format", [
    (".csv", "instruction,input,output\nAdd 2 and 3.,,5\nName a color.,,Blue\n", "alpaca"),
    (".txt", "first line of text\nsecond line of text\n", "text"),
])
def test_csv_and_txt_files_load(tmp_path, tokenizer, suffix, content, data_format):
    path = tmp_path / f"d{suffix}"
    path.write_text(content)
    data = prepare_data(DataSettings(path=str(path), format=data_format, template="alpaca"), tokenizer, 64, seed=0)
    assert data.stats.rows == 2 and len(data.train) == 2


def alpaca_rows(count: int) -> list[dict]:
    return [{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(count)]


def settings_for(path, **fields) -> DataSettings:
    return DataSettings(path=str(path), **fields)


def test_columns_say_where_the_fields_are():
    row = {"question": "Capital of France?", "answer": "Paris", "context": "Geography"}
    conversation = to_conversation(row, "q.csv row 1", "alpaca", {"instruction": "question", "output": "answer",
                                                                    "input": "context"})
    assert conversation == [{"role": "user", "content": "Capital of France?\n\nGeography"},
                            {"role": "assistant", "content": "Paris"}]
    chat = {"dialog": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    assert to_conversation(chat, "c.json row 1", "messages", {"messages": "dialog"})[1]["content"] == "hello"
    with pytest.raises(DataError, match="q.csv row 1: format 'alpaca' needs the column.*question"):
        to_conversation({"answer": "Paris"}, "q.csv row 1", "alpaca", {"instruction": "question", "output": "answer"})


def test_columns_and_prompt_are_checked_against_the_format():
    with pytest.raises(RecipeError, match="'question', which is not a field of format 'alpaca'.*instruction, input"):
        check_columns("alpaca", {"question": "instruction"}, None)
    with pytest.raises(RecipeError, match="needs data.format alpaca"):
        check_columns("sharegpt", {}, "Describe {name}.")
    with pytest.raises(RecipeError, match="names no column"):
        check_columns("alpaca", {}, "Describe it.")


def test_prompt_merges_columns_and_drops_optional_parts():
    prompt = "Describe {name}.[[ Its color is {color}.]][[ It weighs {weight} kg.]]"
    row = {"name": "a plum", "color": "purple", "weight": None, "output": "A small fruit."}
    conversation = to_conversation(row, "f.csv row 2", "alpaca", prompt=prompt)
    assert conversation[0] == {"role": "user", "content": "Describe a plum. Its color is purple."}
    assert conversation[1] == {"role": "assistant", "content": "A small fruit."}
    with pytest.raises(DataError, match=r"f.csv row 2: data.prompt uses the column 'name'.*\[\[ \]\]"):
        to_conversation({"name": "", "output": "x"}, "f.csv row 2", "alpaca", prompt=prompt)


def test_conversation_extension_joins_rows_into_multi_turn(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(12))
    data = prepare_data(settings_for(path, format="alpaca", conversation_extension=3), tokenizer, 512, seed=0)
    assert data.stats.rows == 12 and len(data.train) == 12
    for example in data.train:
        text = tokenizer.decode(example.input_ids)
        said = [line for line in text.splitlines() if line.startswith("Say ")]
        assert len(said) == len(set(said)) == 3  # three different rows
        assert trained_text(tokenizer, example.input_ids, example.labels).count("<|im_end|>") == 3  # every answer is trained
    again = prepare_data(settings_for(path, format="alpaca", conversation_extension=3), tokenizer, 512, seed=0)
    assert [e.input_ids for e in again.train] == [e.input_ids for e in data.train]
    conversations = [[{"role": "system", "content": "S"}, {"role": "user", "content": f"q{i}"},
                      {"role": "assistant", "content": f"a{i}"}] for i in range(4)]
    joined = extend_conversations(conversations, 2, seed=0)
    assert [turn["role"] for turn in joined[0]] == ["system", "user", "assistant", "user", "assistant"]


def test_folder_of_mixed_files_keeps_each_rows_file_and_number(tmp_path, tokenizer):
    import datasets

    folder = tmp_path / "data"
    folder.mkdir()
    rows = alpaca_rows(8)
    write_jsonl(folder / "a.jsonl", rows[:2])
    (folder / "b.json").write_text(json.dumps(rows[2:4]))
    (folder / "c.csv").write_text("instruction,input,output\n" + "".join(f"{r['instruction']},,{r['output']}\n"
                                                                        for r in rows[4:6]))
    datasets.Dataset.from_list(rows[6:]).to_parquet(str(folder / "d.parquet"))
    (folder / "notes.md").write_text("not data")
    (folder / ".cache").mkdir()
    write_jsonl(folder / ".cache" / "old.jsonl", rows)  # hidden folders are not data
    read = read_rows(settings_for(folder))
    assert [str(row.values["output"]) for row in read] == [r["output"] for r in rows]  # csv reads numbers
    assert [row.origin for row in read][::2] == [f"{folder / name} row 1" for name in
                                                   ("a.jsonl", "b.json", "c.csv", "d.parquet")]
    data = prepare_data(settings_for(folder, format="alpaca"), tokenizer, 128, seed=0)
    assert len(data.train) == 8


def test_bad_row_names_its_file_and_row(tmp_path, tokenizer):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", alpaca_rows(3))
    write_jsonl(folder / "b.jsonl", [alpaca_rows(1)[0], {"instruction": "No answer here."}])
    with pytest.raises(DataError) as error:
        prepare_data(settings_for(folder, format="alpaca"), tokenizer, 128, seed=0)
    assert f"{folder / 'b.jsonl'} row 2: format 'alpaca' needs the column(s) output" in error.value.message
    assert "data.skip_invalid: true" in error.value.message


def test_skip_invalid_skips_and_counts_bad_rows(tmp_path, tokenizer):
    rows = alpaca_rows(5)
    rows[1] = {"instruction": "No answer."}
    rows[3] = {"output": "No question."}
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    data = prepare_data(settings_for(path, format="alpaca", skip_invalid=True), tokenizer, 128, seed=0)
    assert (data.stats.rows, data.stats.skipped_invalid, len(data.train)) == (5, 2, 3)
    assert data.stats.first_invalid.startswith(f"{path} row ")


def test_a_row_the_template_rejects_is_a_data_error_or_skipped(tmp_path):
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = REFUSES_SYSTEM + tokenizer.chat_template
    rows = alpaca_rows(4)
    rows[2]["system"] = "Be brief."
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as error:
        prepare_data(settings_for(path, format="alpaca", shuffle=False), tokenizer, 128, seed=0)
    assert error.value.exit_code == 2
    assert f"{path} row 3: the chat template rejects this row: System role not supported" in error.value.message
    assert "data.skip_invalid: true" in error.value.message
    data = prepare_data(settings_for(path, format="alpaca", skip_invalid=True), tokenizer, 128, seed=0)
    assert (data.stats.rows, data.stats.skipped_invalid, len(data.train)) == (4, 1, 3)
    assert data.stats.first_invalid.startswith(f"{path} row 3: the chat template rejects this row")


def test_a_template_that_is_not_valid_jinja_is_a_recipe_error_not_a_row_error(tmp_path):
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = "{% for message in messages %}{{ message['content'] }}"
    path = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(2))
    with pytest.raises(RecipeError, match="not valid Jinja.*endfor.*template line 1") as error:
        prepare_data(settings_for(path, format="alpaca", skip_invalid=True), tokenizer, 128, seed=0)
    assert "row" not in error.value.message


def test_max_samples_and_unshuffled_order(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(10))
    data = prepare_data(settings_for(path, format="alpaca", shuffle=False, max_samples=6, eval_fraction=0.5),
                        tokenizer, 128, seed=0)
    assert [e.origin for e in data.train] == [f"{path} row {n}" for n in (1, 2, 3)]
    assert [e.origin for e in data.eval] == [f"{path} row {n}" for n in (4, 5, 6)]
    shuffled = prepare_data(settings_for(path, format="alpaca", max_samples=6), tokenizer, 128, seed=0)
    assert len(shuffled.train) == 6 and [e.origin for e in shuffled.train] != [f"{path} row {n}" for n in range(1, 7)]


def test_hub_id_offline_names_the_dataset():
    import datasets

    if not datasets.config.HF_HUB_OFFLINE:
        pytest.skip("the test environment must be offline, so that no hub request is made")
    with pytest.raises(DataError, match="'someone/no-such-data'.*hub dataset.*offline"):
        read_rows(settings_for("someone/no-such-data", subset="en", split="train[:10]"))


def test_split_and_subset_are_for_hub_datasets(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(2))
    with pytest.raises(RecipeError, match="data.split and data.subset choose part of a hub dataset"):
        read_rows(settings_for(path, split="test"))


def test_packing_in_prepare_data(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(12))
    plain = prepare_data(settings_for(path, format="alpaca"), tokenizer, 128, seed=0)
    packed = prepare_data(settings_for(path, format="alpaca", packing=True), tokenizer, 128, seed=0)
    assert packed.stats.packed_rows == len(packed.train) < len(plain.train) == 12
    assert all(len(row.input_ids) <= 128 and row.position_ids.count(0) >= 1 for row in packed.train)
    assert sum(row.position_ids.count(0) for row in packed.train) == 12
