"""The tiny family models load through the Auto classes and compute finite logits of the right shape."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tiny_models import FAMILIES, build_tiny_model, build_tiny_tokenizer


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_loads_and_runs(family, tmp_path):
    folder = build_tiny_model(family, tmp_path / family)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.model_type == family
    assert model.config.vocab_size == len(tokenizer)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Say 7."}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all() and logits.std() > 0


def test_tiny_tokenizer_encodes_any_text_and_chatml():
    tokenizer = build_tiny_tokenizer()
    for token in ["<|im_start|>", "<|im_end|>", tokenizer.pad_token]:
        assert len(tokenizer.encode(token)) == 1
    text = "Zoë paid $1,234.50 for 7 kiwis!"  # words and symbols the training sentences never saw
    encoded = tokenizer(text, return_offsets_mapping=True)
    assert tokenizer.decode(encoded["input_ids"]) == text
    assert encoded["offset_mapping"][-1][1] == len(text)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.eos_token == "<|im_end|>"
