"""The benchmark script runs both sides on a tiny shape, and they compute the same losses (TRL's SFTTrainer too);
its calls interleave the sides and its table gives medians, spreads and ratios; the DPO benchmark's
TRL side trains the pairs it is given, and its table compares every side with TRL; the GRPO benchmark's sides train,
TRL's generating every token from the prompts it is given, and its tables compare with TRL. The benchmarks run
where the kernel tests do: on a GPU where there is one, else on the CPU."""

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import DEVICE
from ftcli import bench, bench_common, bench_grpo, bench_peers, bench_preference
from ftcli.plan import CheckpointingChoice

# How far apart two sides' losses may be. On the CPU all compute in float32. On a GPU the bench computes in
# bfloat16, and the plain side keeps the norms, embeddings and head in float32 (prepare_model_for_kbit_training);
# this bench run on the CPU in bfloat16 put the sides' losses at most 1.1e-3 apart. TRL's peer and hf at
# --precision bf16, both wholly in bfloat16 (TRL under autocast, whose float32 ops differ on a GPU), were 1.6e-4
# apart on the CPU in bfloat16
SAME_LOSSES = {"cpu": dict(rel=1e-4), "cuda": dict(abs=3e-3)}[DEVICE.type]


def bench_environment() -> dict[str, str]:
    """The bench runs where the kernel tests do (conftest.DEVICE): on a GPU through the compiled kernels, or with the
    GPUs hidden, on the CPU, through Triton's interpreter (conftest's TRITON_INTERPRET passes on)."""
    return os.environ | ({} if DEVICE.type == "cuda" else {"CUDA_VISIBLE_DEVICES": ""})


def test_bench_sides_train_the_same_model_to_the_same_losses():
    command = [sys.executable, "-m", "ftcli.bench", "--shape", "tiny", "--seq", "32", "--bs", "2",
               "--steps", "2", "--warmup", "1", "--json"]
    completed = subprocess.run(command, capture_output=True, text=True, env=bench_environment())
    assert completed.returncode == 0, completed.stderr[-2000:]
    ftcli, hf = json.loads(completed.stdout.strip().splitlines()[-1])["calls"]
    assert (ftcli["side"], hf["side"]) == ("ftcli", "hf") and "error" not in ftcli, ftcli.get("stderr")
    assert len(hf["step_s"]) == len(ftcli["step_s"]) == 2 and min(ftcli["step_s"]) > 0
    # Same weights, data and LoRA seed, so both sides take the same steps
    assert ftcli["losses"] == pytest.approx(hf["losses"], **SAME_LOSSES)
    # The LoRA weights really moved: the last step sees the first step's batch again, after two updates, which
    # lowered its loss by 0.017 in float32 and in bfloat16, far more than the sides may differ
    assert ftcli["losses"][0] - ftcli["losses"][-1] > 0.005


def test_trl_peer_trains_the_in_memory_model_on_the_same_batches_to_the_same_losses(monkeypatch):
    """TRL's SFTTrainer loads the folder written for it, trains on exactly the in-memory sides' batches (no end token,
    no packing, every token a label) and reaches hf's losses step for step (and so ftcli's: see the test above;
    ftcli's side is left out here, as the Triton interpreter makes it slow).

    Both sides run where the other bench tests do: on the CPU in float32, TRL's fused LM head in Triton's
    interpreter, or on a GPU in bfloat16 (--precision bf16 there), the head compiled. Never on the CPU of a GPU
    machine: compiled Triton finds no driver for CPU tensors, and Triton 3.6's interpreter (the GPU image's) fails
    on TRL's kernel, as on ours, under numpy 2.4 (int() of a one-element array)."""
    import trl

    if DEVICE.type == "cpu":
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # as bench_environment: measure_side's processes inherit it
    args = argparse.Namespace(shape="tiny", precision="bf16", seq=32, bs=2, steps=1, warmup=1, lora_r=8,
                              keep_model=None)
    argv = ["--shape=tiny", "--precision=bf16", "--seq=32", "--bs=2", "--steps=1", "--warmup=1", "--lora-r=8"]
    with bench_peers.peer_inputs(args, ["trl"]) as inputs:
        peer = bench_peers.measure_side("trl", argv, args, inputs)
    hf = bench_peers.measure_side("hf", argv, args, {})
    assert "error" not in peer and "error" not in hf, (peer.get("stderr"), hf.get("stderr"))
    assert peer["same_batches"] is True and peer["versions"]["trl"] == trl.__version__
    assert len(peer["step_s"]) == 1 and peer["step_s"][0] > 0
    assert len(peer["losses"]) == 2 and peer["losses"] == pytest.approx(hf["losses"], **SAME_LOSSES)
    assert peer["losses"][1] != peer["losses"][0]  # the adapter moved after the first step


def test_calls_interleave_the_sides_and_write_the_model_folder_once(monkeypatch, tmp_path):
    """The first call runs ftcli, then the peers as given, and each next call starts one side later; the folder trl
    and unsloth load is written once for all calls (and, kept with --keep-model, not again by a later run)."""
    commands = []

    def side_in_subprocess(side, command):
        commands.append((side, command))
        written = next((option.split("=", 1)[1] for option in command if option.startswith("--write-model=")), None)
        if written:
            os.makedirs(written)
        return {"side": side, "step_s": [1.0], "losses": [1.0], "peak_gib": 1.0}

    monkeypatch.setattr(bench_peers, "side_in_subprocess", side_in_subprocess)
    args = argparse.Namespace(peer=[["unsloth", "trl"], ["hf"]], calls=2, shape="tiny", seq=8, bs=2, steps=1,
                              warmup=1, precision="nf4", lora_r=16, keep_model=str(tmp_path))
    results = bench_peers.run_calls(args, ["--peer", "unsloth,trl", "--peer", "hf", "--calls", "2"])

    assert [(result["call"], result["side"]) for result in results] == \
        [(1, "ftcli"), (1, "unsloth"), (1, "trl"), (1, "hf"), (2, "unsloth"), (2, "trl"), (2, "hf"), (2, "ftcli")]
    assert [side for side, _ in commands] == ["folder", *(side for _, side in bench_peers.call_order(["unsloth", "trl",
                                                                                                      "hf"], 2))]
    assert (tmp_path / "tiny").is_dir() and not (tmp_path / "tiny.partial").exists()
    peer_commands = [command for side, command in commands if side in ("unsloth", "trl")]
    assert all(command[3:5] == peer_commands[0][3:5] for command in peer_commands)  # the same folder and batches
    assert peer_commands[0][3] == str((tmp_path / "tiny").resolve())
    in_memory = [command for side, command in commands if side in ("ftcli", "hf")]
    assert all(command[-3:] in (["--only", "ftcli", "--json"], ["--only", "hf", "--json"]) for command in in_memory)

    commands.clear()
    bench_peers.run_calls(argparse.Namespace(**vars(args) | {"peer": [["trl"]], "calls": 1}), [])
    assert [side for side, _ in commands] == ["ftcli", "trl"]  # the kept folder is reused, not written again


def test_peer_option_takes_names_repeated_or_comma_separated(capsys):
    parser = argparse.ArgumentParser()
    bench_peers.add_arguments(parser)
    assert bench_peers.chosen_peers(parser.parse_args([])) == ["hf"]
    assert bench_peers.chosen_peers(parser.parse_args(["--peer", "unsloth, trl", "--peer", "trl,hf"])) == \
        ["unsloth", "trl", "hf"]
    for bad in (["--peer", "unsloth,peft"], ["--calls", "0"]):
        with pytest.raises(SystemExit) as stopped:
            parser.parse_args(bad)
        assert stopped.value.code == 2
    errors = capsys.readouterr().err
    assert "argument --peer: unknown peer peft: choose from hf, trl, unsloth" in errors
    assert "argument --calls: '0' is not a number of calls: give a whole number, 1 or more" in errors


def test_a_peer_that_is_not_importable_ends_with_a_one_line_reason(tmp_path):
    command = [sys.executable, str(bench_peers.PEER_SCRIPT), "unsloth", str(tmp_path), str(tmp_path / "batches.json"),
               "--precision=nf4", "--warmup=1", "--steps=1", "--rank=16", "--alpha=16", "--targets=q_proj",
               "--seed=3407", "--learning-rate=2e-4"]
    hidden = os.environ | {"PYTHONPATH": ""}  # .peersite, where the GPU machine keeps unsloth, is not on the path
    find = "import importlib.util; print(importlib.util.find_spec('unsloth'))"
    installed = subprocess.run([sys.executable, "-c", find], capture_output=True, text=True, env=hidden, cwd=tmp_path)
    if installed.stdout.strip() != "None":
        pytest.skip("unsloth is installed in this Python itself")
    completed = subprocess.run(command, capture_output=True, text=True, env=hidden, cwd=tmp_path)
    assert completed.returncode == 1 and completed.stdout == ""
    assert completed.stderr.strip().splitlines() == \
        ["unsloth is not importable: put .peersite on PYTHONPATH (../shared/tools/peer-site.sh builds it)"]


def fake_call(side: str, call: int, step_s: list[float], peak_gib, first_loss: float = 12.0) -> dict:
    return {"side": side, "call": call, "step_s": step_s, "losses": [first_loss, first_loss - 1], "peak_gib": peak_gib,
            "device": "GPU", "versions": {"torch": "2.11.0"}}


def test_sft_table_gives_each_sides_median_spread_peak_and_ftclis_ratios(capsys):
    args = argparse.Namespace(shape="tiny", precision="nf4", seq=512, bs=2, calls=3, steps=3, warmup=1, json=False)
    results = []  # 1,024 tokens a step; each call's figure is its median step
    calls = [(0.5, 1.0, 6.0), (0.4, 1.0, 6.5), (0.5, 0.8, 6.2)]  # ftcli's step and peak, unsloth's step
    for call, (ftcli_step, unsloth_step, ftcli_peak) in enumerate(calls, 1):
        results.append(fake_call("ftcli", call, [ftcli_step, ftcli_step, 9.0], ftcli_peak, first_loss=12.5753))
        results.append(fake_call("unsloth", call, [unsloth_step] * 3, 8.0 + call, first_loss=12.5749))
        results.append({"side": "trl", "call": call, "error": "trl is not importable: put .peersite on PYTHONPATH",
                        "stderr": "trl is not importable: put .peersite on PYTHONPATH\n"})
        results.append(fake_call("hf", call, [4.0] * 3, 16.0) if call != 2 else
                       {"side": "hf", "call": 2, "error": "torch.OutOfMemoryError: CUDA out of memory.",
                        "stderr": "Traceback ...\ntorch.OutOfMemoryError: CUDA out of memory.\n"})

    assert bench_peers.report(args, results) == 0  # only a failure of ftcli's own side fails the run
    output = capsys.readouterr().out
    rows = table_rows(output)
    # ftcli: calls at 2,048, 2,560, 2,048 tokens/s: median 2,048, slowest 20% under the fastest; largest peak 6.50
    assert rows["ftcli"] == ["2,048", "20.0%", "6.50", "12.5753", "1.00x", "1.00x", "2,048", "/", "2,560", "/", "2,048"]
    # unsloth: 1,024, 1,024, 1,280: ftcli's 2,048 is 2.00x; its 6.50 GiB is 0.59x unsloth's largest, 11.00
    assert rows["unsloth"] == ["1,024", "20.0%", "11.00", "12.5749", "2.00x", "0.59x", "1,024", "/", "1,024", "/",
                               "1,280"]
    assert " ".join(rows["trl"]) == "failed in calls 1, 2, 3: trl is not importable: put .peersite on PYTHONPATH"
    assert rows["hf"] == ["256", "0.0%", "16.00", "12.0000", "8.00x", "0.41x", "256", "/", "256"]
    assert "failed in call 2: torch.OutOfMemoryError: CUDA out of memory." in output
    assert "--- hf stderr, call 2 (tail) ---" in output and "--- trl stderr" not in output  # one line says it all

    results[0] = {"side": "ftcli", "call": 1, "error": "RuntimeError: boom", "stderr": "RuntimeError: boom\n"}
    assert bench_peers.report(args, results) == 1
    capsys.readouterr()


def test_bench_decode_times_both_decoders_on_the_same_greedy_tokens():
    command = [sys.executable, "-m", "ftcli.bench", "--decode", "--shape", "tiny", "--precision", "bf16",
               "--prompt-len", "8", "--new-tokens", "12", "--steps", "1", "--json"]
    completed = subprocess.run(command, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-2000:]
    generate, ftcli = json.loads(completed.stdout.strip().splitlines()[-1])
    assert (generate["side"], ftcli["side"]) == ("generate", "ftcli")
    # float32 on the CPU: our static-cache loop picks exactly generate's greedy tokens
    assert ftcli["tokens"] == generate["tokens"] and len(ftcli["tokens"]) == 12 and ftcli["same_tokens"] == 12
    assert all(full > first > 0 for side in (generate, ftcli) for full, first in zip(side["full_s"], side["first_s"]))


def test_random_model_keeps_a_tied_head_tied(monkeypatch):
    """Llama-3.2-1B ties its head to the embedding; a copy would add 0.5 GiB to the measured peak."""
    import torch
    from ftcli import shapes

    tied_shape = dict(shapes.SHAPES["tiny"], tie_word_embeddings=True)
    monkeypatch.setitem(shapes.SHAPES, "tiny-tied", tied_shape)
    tied = bench_common.random_model("tiny-tied", "bf16", torch.device("cpu"), torch.float32)
    untied = bench_common.random_model("tiny", "bf16", torch.device("cpu"), torch.float32)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


def test_dpo_bench_defaults_are_the_issues_case():
    """Llama-3-8B, prompt 1,024 + answers 1,024 tokens each, 2 pairs a step, all three sides."""
    args = bench_preference.parse_arguments(["--method", "dpo"])
    assert (args.shape, args.prompt_len, args.answer_len, args.pairs) == ("llama3-8b", 1024, 1024, 2)
    assert args.sides == ["trl", "unsloth", "ftcli", "ftcli-cached"] and args.checkpointing == "offload"


def test_dpo_bench_trl_side_trains_exactly_the_pairs_it_is_given():
    command = [sys.executable, "-m", "ftcli.bench", "--method", "dpo", "--shape", "tiny", "--prompt-len", "12",
               "--answer-len", "6", "--pairs", "2", "--steps", "1", "--warmup", "1", "--sides", "trl", "--json"]
    completed = subprocess.run(command, capture_output=True, text=True, env=bench_environment())
    assert completed.returncode == 0, completed.stderr[-2000:]
    [trl] = json.loads(completed.stdout.strip().splitlines()[-1])
    assert trl["side"] == "trl" and "error" not in trl, trl.get("stderr")
    assert trl["same_ids"] is True  # TRL tokenized the pairs' text back to the ids every side trains on
    assert trl["losses"][0] == pytest.approx(math.log(2), abs=1e-6)  # a new adapter: the policy is its reference
    assert len(trl["losses"]) == 2 and len(trl["step_s"]) == 1 and trl["step_s"][0] > 0


def test_random_pairs_are_seeded_and_end_each_answer():
    pairs = bench_preference.random_pairs("tiny", 3, prompt_len=5, answer_len=4)
    assert pairs == bench_preference.random_pairs("tiny", 3, prompt_len=5, answer_len=4)
    assert all(len(prompt) == 5 and chosen[-1] == rejected[-1] == bench_common.END_ID and len(chosen) == 4
               for prompt, chosen, rejected in pairs)
    drawn = [token for pair in pairs for ids in pair for token in ids[:-1]]
    assert min(drawn) >= bench_common.FIRST_PLAIN_ID and len(set(drawn)) > 20  # never a special token or zero


def test_word_tokenizer_gives_back_the_ids_its_words_were_written_from():
    tokenizer = bench_common.word_tokenizer(512)
    ids = [15, 150, 2, 11, 511]
    assert tokenizer(" ".join(tokenizer.convert_ids_to_tokens(ids)))["input_ids"] == ids


def test_dpo_table_compares_each_side_with_trl(capsys):
    args = argparse.Namespace(shape="tiny", pairs=2, prompt_len=8, answer_len=4, steps=3, warmup=1)  # 32 tokens a step
    results = [{"side": "trl", "step_s": [2.0, 1.0, 3.0], "losses": [0.6931, 0.5], "peak_gib": 10.0, "device": "GPU"},
               {"side": "unsloth", "error": "ModuleNotFoundError: No module named 'unsloth'"},
               {"side": "ftcli", "step_s": [0.5, 0.5, 0.6], "losses": [0.6931, 0.4], "peak_gib": 5.0, "device": "GPU"}]
    bench_preference.print_table(args, results)
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in lines[3:]}
    assert rows["trl"] == ["16", "2.000", "10.00", "1.00x", "1.00x", "0.6931", "0.5000"]
    assert rows["ftcli"] == ["64", "0.500", "5.00", "4.00x", "0.50x", "0.6931", "0.4000"]
    assert rows["unsloth"] == ["failed:", "ModuleNotFoundError:", "No", "module", "named", "'unsloth'"]


def run_grpo_bench(*options: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "ftcli.bench", "--method", "grpo", "--shape", "tiny", "--precision", "bf16",
               "--prompt-len", "6", "--generations", "2", *options]
    return subprocess.run(command, capture_output=True, text=True, env=bench_environment())


def table_rows(output: str) -> dict[str, list[str]]:
    """The rows of a printed benchmark table by side: the lines after its header, which starts with "side"."""
    lines = output.strip().splitlines()
    header = next(index for index, line in enumerate(lines) if line.startswith("side"))
    return {line.split()[0]: line.split()[1:] for line in lines[header + 1:]}


def test_grpo_bench_ftcli_side_trains():
    completed = run_grpo_bench("--completion-len", "4", "--steps", "2", "--warmup", "0", "--sides", "ftcli")
    assert completed.returncode == 0, completed.stderr[-2000:]
    row = table_rows(completed.stdout)["ftcli"]
    step_s, generate_s, generation_speed, training_speed = map(lambda text: float(text.replace(",", "")), row[:4])
    assert step_s > generate_s > 0 and generation_speed > 0 and training_speed > 0
    assert (row[4] == "-") == (DEVICE.type == "cpu")  # a peak on the GPU only
    assert row[5:] == ["-", "-", "4"]  # no TRL to compare with; every completion 4 tokens


def test_grpo_bench_trl_side_generates_every_token_from_the_prompts_it_is_given():
    completed = run_grpo_bench("--completion-len", "24", "--steps", "1", "--warmup", "1", "--sides", "trl", "--json")
    assert completed.returncode == 0, completed.stderr[-2000:]
    [trl] = json.loads(completed.stdout.strip().splitlines()[-1])
    assert trl["side"] == "trl" and "error" not in trl, trl.get("stderr")
    assert trl["same_ids"] is True  # TRL tokenized the prompts' text back to the ids ftcli's side samples from
    assert trl["completion_lengths"] == [24, 24]  # min_new_tokens kept the end token out: every token generated
    assert len(trl["step_s"]) == len(trl["generation_s"]) == 1 and trl["step_s"][0] > trl["generation_s"][0] > 0
    assert len(trl["losses"]) == 2


def test_grpo_bench_defaults_are_the_issues_case():
    """Llama-3-8B in NF4, prompt 256, completions of 1,024, G=8, TRL and ftcli."""
    args = bench_grpo.parse_arguments(["--method", "grpo"])
    assert (args.shape, args.precision, args.prompt_len, args.completion_len, args.generations) == \
        ("llama3-8b", "nf4", 256, 1024, 8)
    assert args.sides == ["trl", "ftcli"] and args.checkpointing == "offload" and not args.find_longest
    recipe = bench_grpo.bench_recipe(args)
    assert (recipe.train.batch_size, recipe.train.learning_rate, recipe.grpo.beta, recipe.grpo.temperature) == \
        (1, 1e-6, 0.0, 1.0)


def test_grpo_table_compares_each_side_with_trl(capsys):
    args = argparse.Namespace(shape="tiny", precision="nf4", prompt_len=8, completion_len=4, generations=2, steps=3,
                              warmup=1)  # 8 tokens generated and 24 trained a step
    results = [{"side": "trl", "step_s": [4.0, 2.0, 3.0], "generation_s": [1.0, 2.0, 4.0], "completion_lengths": [4, 4],
                "peak_gib": 10.0, "device": "GPU"},
               {"side": "ftcli", "step_s": [0.5, 1.0, 1.0], "generation_s": [0.25, 0.5, 0.1], "completion_lengths": [4],
                "peak_gib": 5.0, "device": "GPU"}]
    bench_grpo.print_table(args, results)
    rows = table_rows(capsys.readouterr().out)
    assert rows["trl"] == ["3.00", "2.00", "4", "8", "10.00", "1.00x", "1.00x", "4"]
    assert rows["ftcli"] == ["1.00", "0.25", "32", "24", "5.00", "3.00x", "0.50x", "4"]


def test_find_longest_doubles_each_sides_completion_until_one_fails(monkeypatch, capsys):
    fits = {"trl": 2048, "ftcli": 16384}
    tried = []

    def measure_side(side, args, folder):
        tried.append((side, args.completion_len, args.steps, args.warmup))
        if args.completion_len > fits[side]:
            return {"side": side, "error": "torch.OutOfMemoryError: CUDA out of memory."}
        return {"side": side, "peak_gib": args.completion_len / 1024, "device": "GPU"}

    monkeypatch.setattr(bench_grpo, "measure_side", measure_side)
    monkeypatch.setattr(bench_grpo, "model_folder", lambda args: contextlib.nullcontext("folder"))
    args = bench_grpo.parse_arguments(["--find-longest", "--longest-limit", "8192"])
    found = bench_grpo.find_longest(args)

    assert tried == [("trl", 1024, 1, 0), ("trl", 2048, 1, 0), ("trl", 4096, 1, 0),
                     ("ftcli", 1024, 1, 0), ("ftcli", 2048, 1, 0), ("ftcli", 4096, 1, 0), ("ftcli", 8192, 1, 0)]
    assert [(f["side"], f["longest"], f["peak_gib"], f["failed_at"]) for f in found] == \
        [("trl", 2048, 2.0, 4096), ("ftcli", 8192, 8.0, None)]
    bench_grpo.print_longest(args, found)
    rows = table_rows(capsys.readouterr().out)
    assert rows["trl"] == ["2,048", "2.00", "4,096", "failed:", "torch.OutOfMemoryError:", "CUDA", "out", "of",
                           "memory."]
    assert rows["ftcli"] == ["8,192", "8.00", "not", "tried", "(limit)"]


@pytest.mark.parametrize("distributed", ["ddp", "fsdp"])
@pytest.mark.skipif(torch.cuda.device_count() == 1, reason="with one GPU the two processes would run the kernels in "
                    "Triton's CPU interpreter, which the GPU image's Triton 3.6 refuses for them (as in "
                    "tests/test_sharding.py); with two GPUs they run through NCCL, without a GPU in the interpreter")
def test_bench_trains_on_one_gpu_then_on_two(distributed):
    """--gpus 2 on a tiny shape: the one-process side, then two processes (on the CPU with gloo where there are not
    two GPUs), whose tokens/s counts both processes' rows; fsdp's 16-bit model is built on the meta device."""
    command = [sys.executable, "-m", "ftcli.bench", "--gpus", "2", "--distributed", distributed, "--shape", "tiny",
               "--precision", "bf16", "--seq", "32", "--bs", "2", "--steps", "2", "--warmup", "1",
               "--checkpointing", "true", "--json"]
    on_cpu = {} if torch.cuda.device_count() >= 2 else {"CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"} | on_cpu)
    assert completed.returncode == 0, completed.stderr[-2000:]
    one, two = json.loads(completed.stdout.strip().splitlines()[-1])
    assert "error" not in one and "error" not in two, (one.get("stderr"), two.get("stderr"))
    assert (one["side"], one["gpus"], two["side"], two["gpus"]) == ("1 GPU", 1, f"2 GPUs {distributed}", 2)
    assert len(one["step_s"]) == len(two["step_s"]) == 2
    # random weights over a 512-word vocabulary: a first loss near ln(512), and one that the updates move
    for side in (one, two):
        assert side["losses"][0] == pytest.approx(math.log(512), rel=0.05) and side["losses"][-1] != side["losses"][0]


def test_without_a_gpu_the_bench_runs_the_kernels_in_the_interpreter_and_says_so(monkeypatch, capsys):
    """Triton compiles for GPUs only: on a CPU machine every side's process must inherit TRITON_INTERPRET, which
    Triton reads when first imported (bitsandbytes has imported it by then), so the bench starts itself again."""
    monkeypatch.setenv("TRITON_INTERPRET", "")  # restored after the test, so no later test inherits the bench's "1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    started = []

    def start_again(path, args):
        started.append((path, args))
        raise SystemExit(0)

    monkeypatch.setattr(os, "execv", start_again)
    with pytest.raises(SystemExit):
        bench.main(["--shape", "tiny", "--steps", "1"])
    assert os.environ["TRITON_INTERPRET"] == "1"
    assert started == [(sys.executable, [sys.executable, "-m", "ftcli.bench", "--shape", "tiny", "--steps", "1"])]
    assert "No GPU here: ftcli's kernels run in Triton's CPU interpreter" in capsys.readouterr().err


def test_profile_sums_kernels_by_kind_and_finds_the_gpu_idle():
    """--profile's summary of a step: matmuls split at 100 us, Triton kernels by name, copies between host and GPU
    listed but not counted as computing (they run beside the kernels), and the idle time the gaps between computing
    kernels add up to, overlaps counted once."""
    kernels = [("nvjet_sm90_tst_320x128_gate", 0.0, 600.0), ("Memcpy DtoH (Device -> Pinned)", 100.0, 700.0),
               ("nvjet_sm90_tst_16x64_splitK", 610.0, 10.0), ("void cublasLt::splitKreduce_kernel", 620.0, 2.0),
               ("_dequantize", 650.0, 40.0), ("cudnn_generated_fort_native_sdpa_flash_fprop", 660.0, 100.0),
               ("void at::native::vectorized_elementwise_kernel<8, FillFunctor>", 800.0, 5.0)]
    kernels = [(name, 100 * start, duration if "splitK" in name else 100 * duration) for name, start, duration in kernels]
    lines = bench.kernels_by_kind(kernels).splitlines()
    rows = {line[:50].strip(): line[50:].split() for line in lines[1:-1]}
    assert rows == {"matmul, at least 100 us each": ["60.00", "1"], "copy between host and GPU": ["70.00", "1"],
                    "attention": ["10.00", "1"], "_dequantize": ["4.00", "1"], "matmul, under 100 us each": ["0.01", "2"],
                    "fill, memset": ["0.50", "1"]}
    assert list(rows) == sorted(rows, key=lambda kind: -float(rows[kind][0]))  # longest first
    # computing (ms) 0-60, 61-61.01, 62-62.002, 65-76 (dequantize and attention overlap), 80-80.5: busy 71.512,
    # idle 8.988 in 4 gaps
    assert lines[-1] == "the GPU computed 71.5 ms of the kernels' 80.5 ms span, idle 9.0 ms in 4 gaps"


def test_gpu_memory_runs_the_checkpointing_ftcli_train_plans_for_that_gpu(capsys):
    """--gpu-memory: ftcli's side checkpoints as `ftcli train`'s auto would on that GPU (ftcli/plan.py), says so under
    the table, and takes no hand-set MLP or embedding flags beside it."""
    args = argparse.Namespace(shape="llama3-8b", seq=2048, bs=2, precision="nf4", lora_r=16, checkpointing="offload",
                              gpu_memory=None, keep_mlp=0, host_mlp=0, cuda_graph=True)
    assert bench.ftcli_checkpointing(args) == CheckpointingChoice("offload")
    by_hand = argparse.Namespace(**vars(args) | {"keep_mlp": 3, "host_mlp": 2})
    assert bench.ftcli_checkpointing(by_hand) == CheckpointingChoice("offload", 0, 3, 2)
    for size, choice in (("12GiB", CheckpointingChoice(True, 0, 9, 2, 0, True)),
                         ("80GiB", CheckpointingChoice(False, mlp_weights_dequantized_once=True)),
                         ("7GiB", CheckpointingChoice("offload"))):
        assert bench.ftcli_checkpointing(argparse.Namespace(**vars(args) | {"gpu_memory": size})) == choice
    assert bench.checkpointing_words(CheckpointingChoice(True, 0, 9, 2, 0, True), "12GiB") == \
        "checkpointing true, 9 MLPs kept on the GPU, every 2nd MLP below hosted in CPU memory, MLP weights " \
        "dequantized once per backward (ftcli train's auto on a GPU of 12GiB)"
    # at 8,192 tokens, graphed: attention replayed in the top layers first, as it saves more per byte
    long_rows = argparse.Namespace(**vars(args) | {"seq": 8192, "bs": 1, "gpu_memory": "16GiB"})
    assert bench.ftcli_checkpointing(long_rows) == CheckpointingChoice(True, 0, 3, 2, 32, True)
    assert bench.ftcli_checkpointing(argparse.Namespace(**vars(long_rows) | {"cuda_graph": False})) == \
        CheckpointingChoice(True, 0, 7, 2, 0, True)
    assert bench.checkpointing_words(CheckpointingChoice(True, 0, 3, 2, 32, True), None) == \
        "checkpointing true, 3 MLPs kept on the GPU, every 2nd MLP below hosted in CPU memory, attention of 32 " \
        "layers replayed, MLP weights dequantized once per backward"
    for flags in (["--keep-mlp", "2"], ["--host-embeddings"], ["--host-mlp", "3"]):
        with pytest.raises(SystemExit) as stopped:
            bench.main(["--shape", "tiny", "--only", "ftcli", "--gpu-memory", "1GiB", "--checkpointing", "offload",
                        *flags])
        assert stopped.value.code == 2
        assert "--gpu-memory runs what ftcli train would" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--shape", "tiny", "--only", "ftcli", "--gpu-memory", "lots"])
    assert "--gpu-memory 'lots' is not a size" in capsys.readouterr().err


def test_replaying_attention_needs_offloaded_checkpointing():
    """--replay-attention marks layers checkpointed through OffloadedCheckpoint (ftcli/attention_replay.py); plain
    recompute without MLP flags has none, and the bench says what to add instead of running without it."""
    with pytest.raises(SystemExit) as stopped:
        bench.main(["--shape", "tiny", "--only", "ftcli", "--replay-attention", "2", "--checkpointing", "true"])
    assert "--replay-attention replays attention in the recompute of offloaded checkpointing" in str(stopped.value)


def test_replaying_attention_needs_graphed_steps():
    """The replay takes over the attention of graphed micro-batches (step_graph's CAUSAL_ATTENTION) only: without
    graphs (here no GPU) it would mark layers that never replay, and the table would say otherwise."""
    with pytest.raises(SystemExit) as stopped:
        bench.main(["--shape", "tiny", "--only", "ftcli", "--replay-attention", "2", "--no-cuda-graph"])
    assert "--replay-attention replays attention in CUDA-graphed steps" in str(stopped.value)


def test_hosting_attention_needs_replayed_layers(capsys):
    with pytest.raises(SystemExit) as stopped:
        bench.main(["--shape", "tiny", "--only", "ftcli", "--host-attention"])
    assert stopped.value.code == 2
    assert "--host-attention hosts the outputs that --replay-attention K keeps" in capsys.readouterr().err


def test_hosting_mlps_needs_checkpointing(capsys):
    with pytest.raises(SystemExit) as stopped:
        bench.main(["--shape", "tiny", "--only", "ftcli", "--host-mlp", "2", "--checkpointing", "false"])
    assert stopped.value.code == 2
    assert "--checkpointing false recomputes nothing: use --checkpointing offload" in capsys.readouterr().err
