"""The peers' sides of `python -m ftcli.bench --method dpo`: TRL's DPOTrainer, and Unsloth's patched DPOTrainer.

    python benchmarks/preference_peers.py trl|unsloth FOLDER FOLDER/pairs.json --pairs 2 --warmup 2 --steps 5 \
        --rank 16 --alpha 16 --targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --seed 3407 \
        --beta 0.1 --learning-rate 2e-4

FOLDER is what `python -m ftcli.bench --method dpo --write-model FOLDER` writes: a bf16 model, a word-level
tokenizer (each id one word, so the text below tokenizes back to the ids it was written from) and a JSON
list of the (prompt, chosen, rejected) ids every side trains on. Each side loads the model in NF4 as its users
do, trains through its own trainer with the settings given (the parent passes ftcli's), and prints one JSON line
last: the step times after warm-up, the losses, the peak memory, and whether its trainer saw the same ids. It
lives outside the package: ftcli never imports TRL or Unsloth. Each side imports its libraries inside its
loader, because Unsloth must be imported before transformers, peft and TRL to patch them, and TRL's side must
not be patched.
"""

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

from peer_timing import CUDA, step_timer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")



def load_trl(folder: str, max_length: int, args):
    """transformers + peft + bitsandbytes as TRL's DPO users run them: NF4 with double quantization, bf16
    compute, SDPA, the LoRA adapter added by the trainer from its config."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=nf4 if CUDA else None,
                                                 dtype=torch.bfloat16 if CUDA else torch.float32,
                                                 device_map={"": 0} if CUDA else None, attn_implementation="sdpa")
    lora = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=args.targets,
                      task_type="CAUSAL_LM")
    return model, AutoTokenizer.from_pretrained(folder), lora


def load_unsloth(folder: str, max_length: int, args):
    """Unsloth's loader and adapter, with its own gradient checkpointing; its import patches TRL's trainers."""
    from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(model_name=folder, max_seq_length=max_length,
                                                         dtype=torch.bfloat16, load_in_4bit=True,
                                                         local_files_only=True)
    model = FastLanguageModel.get_peft_model(model, r=args.rank, lora_alpha=args.alpha, lora_dropout=0, bias="none",
                                             target_modules=args.targets, use_gradient_checkpointing="unsloth",
                                             random_state=args.seed, max_seq_length=max_length)
    return model, tokenizer, None


LOADERS = {"trl": load_trl, "unsloth": load_unsloth}


def train(model, tokenizer, lora, pairs: list[list[list[int]]], args) -> dict:
    """Train pairs x (warmup + steps) pairs through DPOTrainer, timing each optimizer step."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    times = []

    # Answers start with a space, so the prompt's words and the answer's stay apart; they end with the end token
    # already, so TRL adds none
    words = lambda ids: " ".join(tokenizer.convert_ids_to_tokens(ids))
    rows = [{"prompt": words(prompt), "chosen": " " + words(chosen), "rejected": " " + words(rejected)}
            for prompt, chosen, rejected in pairs]
    config = DPOConfig(output_dir=tempfile.mkdtemp(prefix="dpo-peer-"), per_device_train_batch_size=args.pairs,
                       gradient_accumulation_steps=1, max_steps=args.warmup + args.steps,
                       learning_rate=args.learning_rate, lr_scheduler_type="constant", weight_decay=0.0,
                       max_grad_norm=1.0, beta=args.beta, loss_type=["sigmoid"], max_length=None,
                       gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
                       bf16=CUDA, use_cpu=not CUDA, optim="adamw_8bit" if CUDA else "adamw_torch", seed=args.seed,
                       logging_steps=1, report_to=[], save_strategy="no", dataloader_num_workers=0,
                       disable_tqdm=True)
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=lora, callbacks=[step_timer(times)])
    same_ids = all([row.get("prompt_ids"), row.get("chosen_ids"), row.get("rejected_ids")] == pair
                   for row, pair in zip(trainer.train_dataset, pairs))
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    return {"step_s": times[args.warmup:], "same_ids": same_ids,
            "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if CUDA else None,
            "device": torch.cuda.get_device_name() if CUDA else "cpu"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("side", choices=sorted(LOADERS))
    parser.add_argument("folder")
    parser.add_argument("pairs_file")
    for name, kind in [("pairs", int), ("warmup", int), ("steps", int), ("rank", int), ("alpha", float),
                       ("seed", int), ("beta", float), ("learning-rate", float)]:
        parser.add_argument(f"--{name}", type=kind, required=True)
    parser.add_argument("--targets", type=lambda names: names.split(","), required=True, help="comma-separated")
    args = parser.parse_args()
    pairs = json.loads(Path(args.pairs_file).read_text())[:args.pairs * (args.warmup + args.steps)]
    max_length = max(len(prompt) + max(len(chosen), len(rejected)) for prompt, chosen, rejected in pairs)
    model, tokenizer, lora = LOADERS[args.side](args.folder, max_length, args)
    print(json.dumps({"side": args.side, **train(model, tokenizer, lora, pairs, args)}), flush=True)


if __name__ == "__main__":
    main()
