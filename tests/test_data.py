"""Rows to conversations to token ids: formats, loss masks, templates and their errors."""

import pytest
from transformers import AutoTokenizer

from conftest import write_jsonl
from ftcli.data import prepare_data
from ftcli.data.formats import to_conversation
from ftcli.data.templates import IGNORE_INDEX, tokenize_conversation, tokenize_text, use_template
from ftcli.errors import RecipeError
from ftcli.recipe import DataSettings

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Your name?"},
                {"role": "assistant", "content": "I am Nimbus."}]


@pytest.fixture(scope="module")
def tokenizer(smollm2_folder):
    return AutoTokenizer.from_pretrained(smollm2_folder)


def trained_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])


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
    with pytest.raises(RecipeError) as error:
        to_conversation(row, "f.jsonl row 4", data_format)
    for fragment in fragments:
        assert fragment in error.value.message


def test_only_assistant_turns_and_their_end_token_are_trained(tokenizer):
    example = tokenize_conversation(tokenizer, CONVERSATION, responses_only=True, max_length=512)
    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert trained_text(tokenizer, example) == "Hello! How can I help?<|im_end|>\nI am Nimbus.<|im_end|>\n"


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
    assert trained_text(alpaca_tokenizer, example) == "Hello! How can I help?<|im_end|>\n\n"
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
