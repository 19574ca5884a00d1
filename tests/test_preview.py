"""`ftcli data preview`: examples with the trained part styled apart, length statistics, and its errors."""

from rich.console import Console

from conftest import assert_clean_failure, run_cli, styled, write_jsonl, write_recipe
from ftcli.data import DataStats
from ftcli.data.preview import MASKED_STYLE, TRAINED_STYLE, length_report, render_example
from ftcli.data.templates import tokenize_conversation
from tiny_models import build_tiny_tokenizer

# With the tiny byte-level tokenizer and the llama-3 template these are 106, 113, ... 141 tokens long
ROWS = [{"instruction": f"Say the number {n}.", "output": f"The number is {n}." + " Really." * n} for n in range(6)]


def test_render_styles_exactly_the_trained_text():
    tokenizer = build_tiny_tokenizer()
    conversation = [{"role": "user", "content": "Say 7."}, {"role": "assistant", "content": "7."},
                    {"role": "user", "content": "Again."}, {"role": "assistant", "content": "7 again."}]
    example = tokenize_conversation(tokenizer, conversation, responses_only=True, max_length=256)
    text = render_example(tokenizer, example)
    assert text.plain == tokenizer.decode(example.input_ids)
    assert styled(text, TRAINED_STYLE) == "7.<|im_end|>\n7 again.<|im_end|>\n"
    assert styled(text, MASKED_STYLE) == ("<|im_start|>user\nSay 7.<|im_end|>\n<|im_start|>assistant\n"
                                          "<|im_start|>user\nAgain.<|im_end|>\n<|im_start|>assistant\n")


def test_length_report_histogram_and_counts():
    stats = DataStats(rows=7, skipped_invalid=1, first_invalid="d.jsonl row 4: no output", examples=6, truncated=2,
                      tokens=190, target_tokens=60, lengths=[5, 12, 25, 38, 50, 60])
    console = Console(width=100, record=True)
    console.print(length_report(stats, 60, 5, 1, 0))
    report = console.export_text()
    bins = [line.split() for line in report.splitlines() if line.strip()[:1].isdigit() and "-" in line.split()[0]]
    assert [line[0] for line in bins][:2] == ["1-6", "7-12"] and len(bins) == 10  # ten bins up to the longest
    assert sum(int(line[-1]) for line in bins) == 6
    assert "2 truncated at max_seq_length 60" in report and "1 invalid rows skipped" in report
    assert "first skipped row: d.jsonl row 4: no output" in report
    assert "60 trained (32%)" in report


def test_preview_command_shows_examples_and_statistics(tmp_path, tiny_model_folder):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_folder("llama"), data, tmp_path / "out",
                          data={"format": "alpaca", "template": "llama-3", "packing": True},
                          model={"max_seq_length": 240})
    result = run_cli("data", "preview", recipe, "-n", "2")
    assert result.exit_code == 0, result.output
    assert result.output.count(f"{data} row ") == 2  # two examples, each headed by its row
    assert "<|start_header_id|>assistant<|end_header_id|>" in result.output
    assert "6 rows -> 6 training / 0 eval examples; 0 truncated at max_seq_length 240" in result.output
    assert "longest 141" in result.output
    assert "packing: 6 training examples in 4 rows of 240 tokens" in result.output  # best fit of 106 ... 141
    assert not (tmp_path / "out").exists()

    cut = run_cli("data", "preview", recipe, "-n", "6", "--set", "model.max_seq_length=125")
    assert cut.exit_code == 0, cut.output
    assert cut.output.count("cut at max_seq_length 125") == 3
    assert "3 truncated at max_seq_length 125" in cut.output


def test_preview_bad_row_names_file_and_row(tmp_path, tiny_model_folder):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:2] + [{"instruction": "No answer."}])
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_folder("llama"), data, tmp_path / "out",
                          data={"format": "alpaca"})
    result = run_cli("data", "preview", recipe)
    assert_clean_failure(result, 2, f"{data} row 3: format 'alpaca' needs the column(s) output")
    skipped = run_cli("data", "preview", recipe, "--set", "data.skip_invalid=true", "-n", "0")
    assert skipped.exit_code == 0, skipped.output
    assert "1 invalid rows skipped" in skipped.output
