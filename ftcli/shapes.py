"""Llama model shapes by name: what `python -m ftcli.bench` builds with random weights and `python -m ftcli.plan`
estimates, so that a measurement and its estimate are of the same model."""

from transformers import LlamaConfig

SHAPES = {
    # hidden, intermediate, layers, heads, kv heads, vocab, tied embeddings, rope theta
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    # small enough for a CPU, to test the benchmark itself
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False, rope_theta=10000.0),
}


def shape_config(name: str, **settings) -> LlamaConfig:
    """The transformers config of the named shape, with `settings` (attention implementation, context) added."""
    return LlamaConfig(**SHAPES[name], **settings)
