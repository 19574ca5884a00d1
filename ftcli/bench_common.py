"""What the training benchmarks share: the random-weight model of a named shape, ftcli's setup of it, and each
side run in its own process.

`python -m ftcli.bench` compares ftcli with its peers for SFT (ftcli/bench.py), DPO (ftcli/bench_preference.py) and
GRPO (ftcli/bench_grpo.py); every side draws the same weights and, on ftcli's side, is set up as `ftcli train` sets it
up. The peers that run their own libraries (TRL and Unsloth for SFT, DPO and GRPO) load those weights from a folder,
with a word-level tokenizer whose text gives back exactly the token ids it was written from.
"""

import argparse
import json
import os
import statistics
import subprocess
from pathlib import Path
from typing import Callable

import bitsandbytes as bnb
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from ftcli.architectures import ARCHITECTURES
from ftcli.recipe import DEFAULT_TARGET_MODULES, LoraSettings
from ftcli.shapes import SHAPES, shape_config
from ftcli.patch import KernelSwaps
from ftcli.plan import CheckpointingChoice
from ftcli.train import prepare_for_training

BENCH_LORA = LoraSettings(r=16, alpha=16, target_modules=DEFAULT_TARGET_MODULES)
LORA_SEED = 3407  # the LoRA initialisation every side draws
CHECKPOINTING = {"offload": "offload", "true": True, "false": False}  # --checkpointing as the recipe spells it
METHODS = ("sft", "dpo", "grpo")
# The word-level tokenizer's special tokens are its first words; random ids are drawn from FIRST_PLAIN_ID up
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
UNKNOWN_ID, BEGIN_ID, END_ID, PAD_ID = range(len(SPECIAL_TOKENS))
FIRST_PLAIN_ID = 10


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of both training benchmarks."""
    parser.add_argument("--method", choices=METHODS, default="sft",
                        help="sft: supervised fine-tuning against its peers (--peer hf, trl, unsloth); dpo: preference training "
                        "against TRL and Unsloth; grpo: reinforcement learning against TRL (their own options: "
                        "--method dpo --help, --method grpo --help)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--checkpointing", choices=sorted(CHECKPOINTING), default="offload",
                        help="ftcli's gradient checkpointing; the others always recompute on the GPU")
    parser.add_argument("--lora-r", type=int, default=BENCH_LORA.r, help="LoRA rank of every side (alpha equals it)")
    parser.add_argument("--steps", type=int, default=5, help="measured steps")
    parser.add_argument("--warmup", type=int, default=2, help="steps run before measuring (compilation, caches)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")


def method_of(argv: list[str]) -> str:
    """The --method in `argv`, before the method's own parser reads the rest."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--method", choices=METHODS, default="sft")
    return parser.parse_known_args(argv)[0].method


def random_model(shape: str, precision: str, device: torch.device, dtype: torch.dtype,
                 packed_in: torch.dtype = torch.uint8):
    """A Llama model of the named shape with random weights; its decoder linears in NF4 when precision is nf4.

    Weights are drawn on the device one layer at a time and quantized right away, as transformers does
    when it loads a checkpoint with a BitsAndBytesConfig, so building an 8B model needs no 16 GB copy (and a 70B
    one in NF4 fits one GPU).
    """
    config = shape_config(shape, max_position_embeddings=131072, attn_implementation="sdpa")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    generator = torch.Generator(device).manual_seed(0)
    # the parts in the order of model.named_parameters(), so the draws are the same whatever the part sizes
    layers = list(model.model.layers)
    parts = [model.model.embed_tokens, *layers, model.model.norm]
    if not config.tie_word_embeddings:
        parts.append(model.lm_head)
    # the parts' names only: a map of every module would keep each replaced 16-bit linear (and its weights) alive
    names = {module: name for name, module in model.named_modules() if any(module is part for part in parts)}
    for part in parts:
        part.to_empty(device=device)
        draw_random_weights(part, names[part], generator)
        if precision == "nf4" and part in layers:
            quantize_linears(part, dtype, packed_in)
    model.tie_weights()  # a tied head still held the embedding's meta tensor
    with torch.device(device):  # the computed buffers were never built on the meta device
        model.model.rotary_emb = type(model.model.rotary_emb)(config)
    if precision == "nf4":
        model.is_loaded_in_4bit = True  # what transformers' bitsandbytes loader marks; peft reads it
    model.requires_grad_(False)
    model.config.use_cache = False
    return model


def draw_random_weights(part: torch.nn.Module, prefix: str, generator: torch.Generator) -> None:
    """`draw_random_weight` for each parameter of `part`; `prefix` is the part's name in the model."""
    for name, parameter in part.named_parameters(prefix=prefix):
        draw_random_weight(parameter, name, generator)


@torch.no_grad()
def draw_random_weight(tensor: torch.Tensor, name: str, generator: torch.Generator) -> None:
    """A norm's weight near 1, any other N(0, 0.02)."""
    if name.endswith("norm.weight"):
        tensor.copy_(1 + 0.1 * torch.randn(tensor.shape, generator=generator, device=tensor.device))
    else:
        tensor.normal_(0, 0.02, generator=generator)


def quantize_linears(layer: torch.nn.Module, compute_dtype: torch.dtype, packed_in: torch.dtype) -> None:
    """A decoder layer's attention and MLP projections replaced by NF4 ones (double quantization), their 4-bit codes
    packed into `packed_in` (the compute dtype for FSDP, as ftcli.loader.load_model(sharded=True) packs them)."""
    for parent in (layer.self_attn, layer.mlp):
        for name, linear in list(parent.named_children()):
            if not isinstance(linear, torch.nn.Linear):
                continue
            quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                          compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True,
                                          quant_storage=packed_in, device="meta")
            # `module`: bitsandbytes keeps the quantization state on the module too, where the LoRA kernels find it
            # once FSDP has gathered the weight into a plain tensor
            quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True, quant_storage=packed_in, module=quantized)
            setattr(parent, name, quantized.to(linear.weight.device))
            del linear


def random_batches(shape: str, seq: int, rows: int) -> list[list[list[int]]]:
    """The SFT bench's two batches of `rows` x `seq` random token ids, seeded; every side alternates them, so that no
    step replays the previous one's data."""
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, SHAPES[shape]["vocab_size"], (rows, seq), generator=generator).tolist() for _ in range(2)]


def device_and_dtype() -> tuple[torch.device, torch.dtype]:
    """The GPU in bf16 when there is one, else the CPU in float32."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Token i is the word "t{i}" (the special tokens aside), so that text of its words, space-separated,
    tokenizes to exactly the ids it was written from."""
    words = {token: i for i, token in enumerate(SPECIAL_TOKENS)} | {f"t{i}": i for i in range(len(SPECIAL_TOKENS),
                                                                                                vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab=words, unk_token=SPECIAL_TOKENS[UNKNOWN_ID]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    unknown, begin, end, pad = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=unknown, bos_token=begin, eos_token=end,
                                   pad_token=pad)


def write_random_model(shape: str, folder: Path) -> None:
    """The peers' model: the random weights ftcli's side draws in memory, in the compute dtype, and the word
    tokenizer."""
    device, dtype = device_and_dtype()
    random_model(shape, "bf16", device, dtype).save_pretrained(folder)
    word_tokenizer(SHAPES[shape]["vocab_size"]).save_pretrained(folder)


def ftcli_setup(model, checkpointing: CheckpointingChoice,
                lora_r: int = BENCH_LORA.r) -> tuple[torch.nn.Module, KernelSwaps]:
    """The path `ftcli train` takes after loading: kernels, checkpointing (with the MLPs its plan keeps on the GPU or
    hosts) and LoRA."""
    lora = BENCH_LORA.model_copy(update={"r": lora_r, "alpha": lora_r})
    return prepare_for_training(model, ARCHITECTURES["llama"], lora, kernels=True, checkpointing=checkpointing,
                                seed=LORA_SEED)


def ratio(value, reference) -> str:
    """A table's "1.23x" of value over reference, "-" when either is missing."""
    return "-" if value is None or not reference else f"{value / reference:.2f}x"


def against_trl(results: list[dict]) -> Callable[[dict], tuple[str, str]]:
    """For a table of sides: each side's (speed, peak) over TRL's, from their median step and peak, "-" without a
    TRL row that ran."""
    trl = next((r for r in results if r["side"] == "trl" and "error" not in r), None)

    def ratios(result: dict) -> tuple[str, str]:
        if trl is None:
            return "-", "-"
        return (ratio(statistics.median(trl["step_s"]), statistics.median(result["step_s"])),
                ratio(result["peak_gib"], trl["peak_gib"]))

    return ratios


def side_in_subprocess(side: str, command: list[str]) -> dict:
    """Run one side's command, which prints its result as a JSON line last, in its own process, so that no side
    inherits another's allocations or compiled kernels; a failure is a result that says why."""
    completed = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    if completed.returncode != 0:
        return {"side": side, "error": (completed.stderr.strip().splitlines() or ["no output"])[-1],
                "stderr": completed.stderr[-4000:]}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def report(results: list[dict], as_json: bool, print_table: Callable[[], None]) -> None:
    """The sides' results as one JSON line, or the failed sides' stderr and then the table."""
    if as_json:
        print(json.dumps(results))
        return
    for result in results:
        if "stderr" in result:
            print(f"--- {result['side']} stderr (tail) ---\n{result['stderr']}")
    print_table()
