"""TRL's side of `python -m ftcli.bench --method grpo`: its GRPOTrainer, generating with transformers' generate.

    python benchmarks/grpo_peers.py FOLDER FOLDER/prompts.json --generations 8 --completion-len 1024 --warmup 2 \
        --steps 5 --rank 16 --alpha 16 --targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj \
        --seed 3407 --learning-rate 1e-6 --precision nf4 --reward-pattern '^t\d*[02468]\b'

FOLDER is what `python -m ftcli.bench --method grpo --write-model FOLDER` writes: a bf16 model, a word-level
tokenizer (each id one word, so the text below tokenizes back to the ids it was written from) and a JSON list of
the prompts' ids. The model is loaded as TRL's users load it (NF4 with double quantization and bf16 compute, or
16-bit with --precision bf16; float32 on the CPU), and GRPOTrainer adds the LoRA adapter and trains one prompt a
step with G completions, every one exactly --completion-len tokens (min_new_tokens masks the end-of-sequence
token until then). The script prints one JSON line last: the step times and generation times after warm-up, the
losses, the completion lengths, the peak memory, and whether TRL generated from the prompt ids it was given. It
lives outside the package: ftcli never imports TRL.
"""

import argparse
import json
import os
import re
import tempfile
import time
from pathlib import Path

import torch

from peer_timing import CUDA, step_timer, synchronize

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")



def load_model(folder: str, precision: str):
    """The model as TRL's GRPO users load it; the saved config turned the cache off for training, which a real
    checkpoint leaves on, and generate would run without it."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if precision == "nf4" and not CUDA:
        raise SystemExit("--precision nf4 needs a GPU (bitsandbytes' NF4); use --precision bf16 on the CPU")
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=nf4 if precision == "nf4" else None,
                                                 dtype=torch.bfloat16 if CUDA else torch.float32,
                                                 device_map={"": 0} if CUDA else None, attn_implementation="sdpa")
    model.config.use_cache = True
    return model


class GenerationTimer:
    """Wraps the model's generate: times each call (synchronized), and keeps the prompt ids and the number of new
    tokens of each call."""

    def __init__(self, model):
        self.generate, self.seconds, self.new_tokens, self.prompts = model.generate, [], [], []
        model.generate = self

    def __call__(self, *args, **kwargs):
        synchronize()
        started = time.perf_counter()
        output = self.generate(*args, **kwargs)
        synchronize()
        self.seconds.append(time.perf_counter() - started)
        prompt_ids = kwargs["input_ids"]
        self.prompts.append(prompt_ids.tolist())
        self.new_tokens.append(output.size(1) - prompt_ids.size(1))
        return output


def train(model, tokenizer, prompts: list[list[int]], args) -> dict:
    """Train warmup + steps prompts through GRPOTrainer, timing each optimizer step and each generate call."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    times = []

    def pattern_reward(completions, **_) -> list[float]:
        """What ftcli's built-in regex_format scores: 1 where the pattern matches the completion, else 0."""
        return [float(re.search(args.reward_pattern, text, re.DOTALL) is not None) for text in completions]

    rows = [{"prompt": " ".join(tokenizer.convert_ids_to_tokens(ids))} for ids in prompts]
    config = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="grpo-peer-"), num_generations=args.generations,
                        per_device_train_batch_size=args.generations, gradient_accumulation_steps=1,
                        max_steps=args.warmup + args.steps, learning_rate=args.learning_rate,
                        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
                        max_completion_length=args.completion_len, temperature=1.0, top_p=1.0, beta=0.0,
                        loss_type="grpo", generation_kwargs={"min_new_tokens": args.completion_len},
                        shuffle_dataset=False, gradient_checkpointing=True,
                        gradient_checkpointing_kwargs={"use_reentrant": False}, bf16=CUDA, use_cpu=not CUDA,
                        optim="adamw_8bit" if CUDA else "adamw_torch", seed=args.seed, logging_steps=1, report_to=[],
                        save_strategy="no", dataloader_num_workers=0, disable_tqdm=True)
    lora = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=args.targets,
                      task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=pattern_reward, args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, peft_config=lora, callbacks=[step_timer(times)])
    timer = GenerationTimer(trainer.model)
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    return {"step_s": times[args.warmup:], "generation_s": timer.seconds[args.warmup:],
            "completion_lengths": timer.new_tokens,
            "same_ids": all(rows == [ids] * args.generations for rows, ids in zip(timer.prompts, prompts)),
            "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if CUDA else None,
            "device": torch.cuda.get_device_name() if CUDA else "cpu"}


def main() -> None:
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("prompts_file")
    for name, kind in [("generations", int), ("completion-len", int), ("warmup", int), ("steps", int), ("rank", int),
                       ("alpha", float), ("seed", int), ("learning-rate", float)]:
        parser.add_argument(f"--{name}", type=kind, required=True)
    parser.add_argument("--targets", type=lambda names: names.split(","), required=True, help="comma-separated")
    parser.add_argument("--precision", choices=["nf4", "bf16"], required=True)
    parser.add_argument("--reward-pattern", required=True, help="the regular expression a rewarded completion matches")
    args = parser.parse_args()
    prompts = json.loads(Path(args.prompts_file).read_text())[:args.warmup + args.steps]
    model = load_model(args.folder, args.precision)
    print(json.dumps({"side": "trl", **train(model, AutoTokenizer.from_pretrained(args.folder), prompts, args)}),
          flush=True)


if __name__ == "__main__":
    main()
