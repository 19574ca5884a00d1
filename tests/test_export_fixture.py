"""GGUF files of the README's quickstart run (SmolLM2-135M taught a new identity), loaded by transformers, against
the merged model: top tokens teacher-forced over the 24 identity chats, and greedy answers to identity prompts."""

import json

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ROOT, greedy_reply
from ftcli.export.go_template import ollama_prompt
from ftcli.export.modelfile import modelfile_fields

DATA = ROOT / "recipes" / "data" / "identity.jsonl"
# two of the training questions and two it never saw
PROMPTS = ["Who are you?", "Who made you?", "Please introduce yourself.", "What's your name?"]


def identity_chats(tokenizer) -> tuple[list[list[int]], torch.Tensor]:
    """Token ids of every identity chat, and which positions predict a token the assistant writes."""
    def length(messages, **options) -> int:
        return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **options)["input_ids"])

    sequences, answer = [], []
    for line in DATA.read_text().splitlines():
        messages = json.loads(line)["messages"]
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        sequences.append(ids)
        in_answer = [False] * len(ids)
        for turn, message in enumerate(messages):
            if message["role"] == "assistant":  # its words and the end-of-turn token, not the newline after it
                start = length(messages[:turn], add_generation_prompt=True)
                end = ids.index(tokenizer.eos_token_id, start) + 1
                in_answer[start:end] = [True] * (end - start)
        answer += in_answer[1:] + [False]  # position p predicts token p + 1
    return sequences, torch.tensor(answer)


def top_tokens(model, sequences) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(torch.tensor([ids])).logits[0].argmax(-1) for ids in sequences])


def greedy_answers(model, tokenizer) -> list[list[int]]:
    return [greedy_reply(model, tokenizer, prompt, 32) for prompt in PROMPTS]


@pytest.mark.slow
def test_fixture_gguf_files_agree_with_the_merged_model(quickstart_export):
    reader = gguf.GGUFReader(quickstart_export / "quickstart-q4_k_m.gguf")
    # the fixture folder's tokenizer was rebuilt by transformers from the GGUF as plain GPT-2 byte-level splitting
    # (no digit split, unlike SmolLM's own): the export names what this tokenizer does
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert len(reader.fields["tokenizer.ggml.merges"].contents()) == 48900  # as in the fixture's own GGUF

    tokenizer = AutoTokenizer.from_pretrained(quickstart_export / "merged")
    sequences, answer = identity_chats(tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(quickstart_export / "merged", dtype=torch.float32).eval()
    expected, expected_answers = top_tokens(merged, sequences), greedy_answers(merged, tokenizer)
    assert all("Nimbus" in tokenizer.decode(answer_ids) for answer_ids in expected_answers)
    agreement = {}
    for name in ("f16", "q8_0", "q4_k_m"):
        model = AutoModelForCausalLM.from_pretrained(quickstart_export, gguf_file=f"quickstart-{name}.gguf",
                                                     dtype=torch.float32).eval()
        same = top_tokens(model, sequences) == expected
        agreement[name] = {"answers": same[answer].float().mean().item(), "every position": same.float().mean().item(),
                           "greedy": greedy_answers(model, tokenizer) == expected_answers}
    print(agreement)
    assert agreement["f16"] == {"answers": 1.0, "every position": 1.0, "greedy": True}
    # The 99% and 90%, over the 520 positions where the model writes its answers: measured 1.000 and 1.000
    # (1.000 and 0.998 to 1.000 over training seeds 0, 1 and 2)
    assert agreement["q8_0"]["answers"] >= 0.99 and agreement["q8_0"]["greedy"]
    assert agreement["q4_k_m"]["answers"] >= 0.90 and agreement["q4_k_m"]["greedy"]
    # Over all 1,404 positions, the prompts too (the system prompt and the user's words, where the top token is
    # often a near-tie): measured 0.995 and 0.916 (0.958-0.995 and 0.868-0.927 over seeds 0-2). llama.cpp's own
    # llama-quantize writes the same tensors (tests/test_llama_cpp.py), so this is the model, not the export.
    assert agreement["q8_0"]["every position"] >= 0.95
    assert agreement["q4_k_m"]["every position"] >= 0.85


@pytest.mark.slow
def test_fixture_modelfile_gives_ollama_the_prompt_training_used(quickstart_export):
    """The quickstart's Modelfile, filled as Ollama fills it, is the text the model was trained on: SmolLM2's
    ChatML with its default system message, after the BOS the GGUF tells llama.cpp to add (none)."""
    text = (quickstart_export / "quickstart-q4_k_m.Modelfile").read_text()
    template, system, stops = modelfile_fields(text)
    assert system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face" and "<|im_end|>" in stops
    fields = gguf.GGUFReader(quickstart_export / "quickstart-q4_k_m.gguf").fields
    adds_bos = "tokenizer.ggml.add_bos_token" in fields and fields["tokenizer.ggml.add_bos_token"].contents()
    tokenizer = AutoTokenizer.from_pretrained(quickstart_export / "merged")
    for line in DATA.read_text().splitlines()[:4]:
        chat = json.loads(line)["messages"]
        chat = chat + [{"role": "user", "content": "And who trained you?"}]
        for messages in (chat, [{"role": "system", "content": "Answer in French."}] + chat):
            trained = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            assert (tokenizer.bos_token if adds_bos else "") + ollama_prompt(template, system, messages) == trained
