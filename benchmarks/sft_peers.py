"""The peers' sides of `python -m ftcli.bench --peer trl|unsloth`: TRL's SFTTrainer, and Unsloth's FastLanguageModel.

    python benchmarks/sft_peers.py trl|unsloth FOLDER BATCHES --precision nf4 --warmup 2 --steps 5 --rank 16 \
        --alpha 16 --targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --seed 3407 --learning-rate 2e-4

FOLDER is what `python -m ftcli.bench --write-model FOLDER` writes: the bf16 weights ftcli's side draws in memory
and a word-level tokenizer. BATCHES is a JSON list of the batches of token ids (rows of one length) that every side
trains on, in turn, one a step. Each side loads the model as its users do (NF4 with double quantization and bf16
compute, or 16-bit with --precision bf16), trains warmup + steps steps, and prints one JSON line last: the step
times after warm-up, the losses, the peak memory from the first step on, and the versions that ran.

- **trl**: TRL's SFTTrainer on transformers + peft + bitsandbytes: the model kept in bf16 (no
  prepare_model_for_kbit_training), the adapter added by the trainer from a LoraConfig, non-reentrant checkpointing,
  bitsandbytes' AdamW8bit (not paged), TRL's fused LM head, its defaults otherwise. The rows are given as
  `input_ids`, which TRL takes as tokenized: no end token is added, every token is a label, nothing is packed. Steps
  are timed by a TrainerCallback, and the result says whether every step saw exactly its batch. On the CPU it runs
  in float32 (--precision bf16 only), which is how the tests run it.
- **unsloth**: Unsloth's FastLanguageModel (its 4-bit load, `use_gradient_checkpointing="unsloth"`) in a plain loop:
  the model's own loss, AdamW8bit, clipping at 1.0, timed as ftcli's side is. GPU only.

It lives outside the package: ftcli never imports TRL or Unsloth. A peer whose library is not importable ends at
once with a one-line reason, the last line of its stderr.
"""

import argparse
import importlib.metadata
import importlib.util
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from peer_timing import CUDA, step_timer, synchronize

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")

PEER_SITE_HINT = "put .peersite on PYTHONPATH (../shared/tools/peer-site.sh builds it)"
# The packages whose versions each side reports
VERSIONS_OF = {"trl": ("trl", "transformers", "peft", "bitsandbytes", "datasets", "torch"),
               "unsloth": ("unsloth", "unsloth_zoo", "transformers", "peft", "bitsandbytes", "torch")}
MAX_GRAD_NORM = 1.0


def train_trl(folder: str, batches: list[list[list[int]]], args) -> dict:
    """TRL's SFTTrainer over warmup + steps steps, the batches in turn, timing each optimizer step."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=nf4 if args.precision == "nf4" else None,
                                                 dtype=torch.bfloat16 if CUDA else torch.float32,
                                                 device_map={"": 0} if CUDA else None, attn_implementation="sdpa")
    times = []

    step_count = args.warmup + args.steps
    expected = [batches[step % len(batches)] for step in range(step_count)]
    config = SFTConfig(output_dir=tempfile.mkdtemp(prefix="sft-peer-"), per_device_train_batch_size=len(batches[0]),
                       gradient_accumulation_steps=1, max_steps=step_count, learning_rate=args.learning_rate,
                       lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM,
                       max_length=len(batches[0][0]), packing=False, train_sampling_strategy="sequential",
                       gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
                       bf16=CUDA, use_cpu=not CUDA, optim="adamw_bnb_8bit", seed=args.seed, logging_steps=1,
                       report_to=[], save_strategy="no", dataloader_num_workers=0, disable_tqdm=True)
    lora = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=args.targets,
                      task_type="CAUSAL_LM")
    torch.manual_seed(args.seed)  # the LoRA weights SFTTrainer draws as it adds the adapter, as every side draws them
    trainer = SFTTrainer(model=model, args=config, processing_class=AutoTokenizer.from_pretrained(folder),
                         train_dataset=Dataset.from_list([{"input_ids": row} for batch in expected for row in batch]),
                         peft_config=lora, callbacks=[step_timer(times, reset_peak_at_start=True)])
    collated = BatchRecorder(trainer.data_collator)
    trainer.data_collator = collated
    trainer.train()
    return {"step_s": times[args.warmup:], "same_batches": collated.saw_exactly(expected),
            "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]}


class BatchRecorder:
    """Wraps SFTTrainer's collator and keeps what each step trained on, to show that each step saw exactly its
    batch: no row packed, padded, shortened or given an end token, every token a label."""

    def __init__(self, collate):
        self.collate, self.batches = collate, []

    def __call__(self, rows):
        batch = self.collate(rows)
        self.batches.append({name: batch[name].tolist() for name in ("input_ids", "labels", "attention_mask")})
        return batch

    def saw_exactly(self, expected: list[list[list[int]]]) -> bool:
        return len(self.batches) == len(expected) and all(
            seen["input_ids"] == seen["labels"] == ids and all(all(row) for row in seen["attention_mask"])
            for seen, ids in zip(self.batches, expected))


def train_unsloth(folder: str, batches: list[list[list[int]]], args) -> dict:
    """Unsloth's 4-bit (or 16-bit) load and adapter, trained in a plain loop timed as ftcli's side is."""
    from unsloth import FastLanguageModel  # before bitsandbytes and transformers: its import patches them

    import bitsandbytes as bnb

    seq = len(batches[0][0])
    model, _ = FastLanguageModel.from_pretrained(model_name=folder, max_seq_length=seq, dtype=torch.bfloat16,
                                                 load_in_4bit=args.precision == "nf4", local_files_only=True)
    model = FastLanguageModel.get_peft_model(model, r=args.rank, lora_alpha=args.alpha, lora_dropout=0, bias="none",
                                             target_modules=args.targets, use_gradient_checkpointing="unsloth",
                                             random_state=args.seed, max_seq_length=seq)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.AdamW8bit(trainable, lr=args.learning_rate, weight_decay=0.0)
    on_device = [torch.tensor(batch, device="cuda") for batch in batches]

    model.train()
    synchronize()
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        ids = on_device[step % len(on_device)]
        started = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))  # synchronizes with the device
        times.append(time.perf_counter() - started)
    return {"step_s": times[args.warmup:], "losses": losses}


TRAINERS = {"trl": train_trl, "unsloth": train_unsloth}


def require(args) -> None:
    """End with a one-line reason when the peer cannot run here: its library is not importable, or it needs a GPU."""
    if importlib.util.find_spec(args.peer) is None:
        raise SystemExit(f"{args.peer} is not importable: {PEER_SITE_HINT}")
    if args.peer == "unsloth" and not CUDA:
        raise SystemExit("unsloth needs a GPU: its kernels run on CUDA only")
    if args.precision == "nf4" and not CUDA:
        raise SystemExit(f"{args.peer} with --precision nf4 needs a GPU (bitsandbytes' NF4); use --precision bf16 on "
                         "the CPU")


def versions(peer: str) -> dict[str, str]:
    found = {}
    for package in VERSIONS_OF[peer]:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "unknown"
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("peer", choices=sorted(TRAINERS))
    parser.add_argument("folder")
    parser.add_argument("batches_file")
    parser.add_argument("--precision", choices=["nf4", "bf16"], required=True)
    for name, kind in [("warmup", int), ("steps", int), ("rank", int), ("alpha", float), ("seed", int),
                       ("learning-rate", float)]:
        parser.add_argument(f"--{name}", type=kind, required=True)
    parser.add_argument("--targets", type=lambda names: names.split(","), required=True, help="comma-separated")
    args = parser.parse_args()
    require(args)
    batches = json.loads(Path(args.batches_file).read_text())
    result = TRAINERS[args.peer](args.folder, batches, args)
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if CUDA else None
    print(json.dumps({"side": args.peer, **result, "peak_gib": peak_gib,
                      "device": torch.cuda.get_device_name() if CUDA else "cpu", "versions": versions(args.peer)}),
          flush=True)


if __name__ == "__main__":
    main()
