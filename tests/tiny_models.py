"""Tiny random-weight models of every supported family, built from transformers' config classes.

No download: the tokenizer is a small byte-level BPE trained here, with a ChatML template, so any text
encodes. It splits text as Qwen2's tokenizer does: transformers rebuilds a qwen2 folder's tokenizer with
Qwen2's splitting whatever class the folder names, and matching it keeps one tokenizer for every family.

Shapes are tiny but keep each family's own options (soft-capping, sliding windows shorter than a chat row,
fused projections, head_dim apart from hidden/heads, tied embeddings), so the code paths that differ between
families run in tests. Projection sizes are multiples of 32, which bitsandbytes' NF4 CPU kernel needs.
"""

from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GemmaConfig, LlamaConfig,
                          MistralConfig, Phi3Config, PreTrainedTokenizerFast, Qwen2Config, Qwen3Config)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"]

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2; padding uses 0, as in Qwen2.5
TOKENIZER_SIZE = 320  # 256 byte symbols, 3 special tokens and merges; the corpus has more merges than that
CORPUS = ["What is one plus two? One plus two is three.", "Say the number 7. The number is 7.",
          "user assistant system Hello, how can I help you today?", "0123456789 the quick brown fox jumps"]
SLIDING_WINDOW = 16  # shorter than a chat row, so the sliding-window masks really cut


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with ChatML special tokens, trained in milliseconds on a few sentences."""
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    return tokenizer


def tiny_config(family: str, vocab_size: int):
    # initializer_range 0.1 rather than 0.02: at hidden size 64 the default leaves logits within about +-1, and
    # Gemma's scaled, tied embeddings then barely move under a small LoRA, so its loss could not fall in a test
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    # Gemma 2 and 3 scale queries by query_pre_attn_scalar**-0.5; real checkpoints set it to their head_dim
    gemma2 = dict(head_dim=32, query_pre_attn_scalar=32)
    both_attention_kinds = ["sliding_attention", "full_attention"]
    configs = {
        "llama": lambda: LlamaConfig(**common),
        "mistral": lambda: MistralConfig(**common, sliding_window=SLIDING_WINDOW),
        "qwen2": lambda: Qwen2Config(**common),  # its q, k and v projections carry a bias
        "qwen3": lambda: Qwen3Config(**common, head_dim=32, tie_word_embeddings=True),  # as Qwen3-4B
        "gemma": lambda: GemmaConfig(**common, head_dim=32),
        "gemma2": lambda: Gemma2Config(**common, **gemma2, sliding_window=SLIDING_WINDOW,
                                       layer_types=both_attention_kinds, attn_logit_softcapping=50.0,
                                       final_logit_softcapping=30.0),
        "gemma3_text": lambda: Gemma3TextConfig(**common, **gemma2, sliding_window=SLIDING_WINDOW,
                                                layer_types=both_attention_kinds),
        "phi3": lambda: Phi3Config(**common),  # fuses q, k, v into qkv_proj and gate, up into gate_up_proj
    }
    return configs[family]()


def build_tiny_model(family: str, folder: Path, seed: int = 0) -> Path:
    """Write a loadable model folder (float32 random weights + the tiny tokenizer) and return it."""
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer)), dtype=torch.float32)
    # Matrices only: biases start at zero, and Gemma's norm weights at zero on purpose (they scale by 1 + weight)
    assert all(weight.abs().sum() > 0 for weight in model.parameters() if weight.dim() > 1), family
    with torch.no_grad():
        logits = model(torch.tensor([tokenizer.encode("Say the number 7.")])).logits
    assert torch.isfinite(logits).all() and logits.std() > 0, family
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)
