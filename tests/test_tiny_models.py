"""The tiny family models load through the Auto classes and compute finite logits of the right shape."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tiny_models import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_loads_and_runs(family, tiny_model_folder):
    folder = tiny_model_folder(family)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.model_type == family
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Say 7."}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    assert tokenizer.decode(ids[0]).endswith("<|im_start|>assistant\n")
    logits = model(ids).logits
    assert len(tokenizer) <= model.config.vocab_size
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()
    assert logits.std() > 0
