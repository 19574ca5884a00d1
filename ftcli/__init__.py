"""ftcli: fine-tune open LLMs with LoRA/QLoRA from YAML recipes."""

__version__ = "0.1.0"
