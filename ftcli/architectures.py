"""The model families ftcli supports, keyed by the `model_type` of their Hugging Face config.

Adding a family is one entry here plus its tiny-model test. Recipes name LoRA targets in Llama's
vocabulary (q_proj ... down_proj); families that fuse projections map those names to their own.
"""

from dataclasses import dataclass, field

from ftcli.errors import ModelError


@dataclass(frozen=True)
class Architecture:
    family: str
    lora_target_aliases: dict[str, str] = field(default_factory=dict)
    attention: str = "sdpa"  # transformers' attn_implementation; Gemma 2's logit soft-capping has no SDPA path
    norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + weight): 1 for the Gemma family

    def lora_targets(self, requested: list[str]) -> list[str]:
        """The module names of this family for the requested Llama-style names, in order, without repeats."""
        return list(dict.fromkeys(self.lora_target_aliases.get(name, name) for name in requested))


ARCHITECTURES = {
    "llama": Architecture("Llama"),
    "mistral": Architecture("Mistral"),
    "qwen2": Architecture("Qwen2"),
    "qwen3": Architecture("Qwen3"),
    "gemma": Architecture("Gemma", norm_offset=1.0),
    "gemma2": Architecture("Gemma 2", attention="eager", norm_offset=1.0),
    "gemma3_text": Architecture("Gemma 3", norm_offset=1.0),
    "phi3": Architecture("Phi-3", {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                                   "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}),
}


def architecture_of(config, model: str) -> Architecture:
    """The supported architecture for a config, or an error naming what is supported; `model` says which model
    for the message ("model.name 'path'")."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        supported = ", ".join(f"{arch.family} ({key})" for key, arch in ARCHITECTURES.items())
        raise ModelError(f"{model} is a {model_type!r} model, which ftcli does not support. "
                         f"Supported architectures: {supported}.")
    return ARCHITECTURES[model_type]
