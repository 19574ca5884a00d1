"""Tiny random-weight models of every supported family, built from transformers' config classes.

No download: the tokenizer is a small byte-level BPE trained here, with a ChatML template, so any text
encodes. Shapes are tiny but keep each family's own options (soft-capping, sliding windows, fused
projections, explicit head_dim), and stay multiples of 64 so bitsandbytes can quantize them to NF4.
"""

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GemmaConfig, LlamaConfig,
                          MistralConfig, Phi3Config, PreTrainedTokenizerFast, Qwen2Config, Qwen3Config)

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"]

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
VOCAB_SIZE = 384  # above the tokenizer's length, as in real models, and a multiple of 64
SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["What is one plus two? One plus two is three.", "Say the number 7. The number is 7.",
          "user assistant system Hello, how can I help you today?", "0123456789 the quick brown fox jumps"]


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - 32, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|pad|>")
    tokenizer.chat_template = CHATML
    return tokenizer


def tiny_config(family: str, vocab_size: int):
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    configs = {
        "llama": lambda: LlamaConfig(**common),
        "mistral": lambda: MistralConfig(**common, sliding_window=128),
        "qwen2": lambda: Qwen2Config(**common),
        "qwen3": lambda: Qwen3Config(**common, head_dim=32),
        "gemma": lambda: GemmaConfig(**common, head_dim=16),
        "gemma2": lambda: Gemma2Config(**common, head_dim=16, sliding_window=64, final_logit_softcapping=30.0,
                                       attn_logit_softcapping=50.0),
        "gemma3_text": lambda: Gemma3TextConfig(**common, head_dim=16, sliding_window=64),
        "phi3": lambda: Phi3Config(**common),
    }
    return configs[family]()


def build_tiny_model(family: str, folder: Path, seed: int = 0) -> Path:
    """Write a loadable model folder (float32 random weights + the tiny tokenizer) and return it."""
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, VOCAB_SIZE), dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)
