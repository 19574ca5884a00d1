"""The `ftcli` command line: parses arguments, calls the module that does the work, reports errors."""

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.text import Text

from ftcli.errors import FtcliError, PeerStopped, debugging, redact, redacted_traceback, unexpected_error

TRUST_REMOTE_CODE_HELP = ("Run Python code shipped with the model (transformers' trust_remote_code); only for models "
                          "you trust. An output folder's recipe.yaml cannot turn this on.")

app = typer.Typer(help="Fine-tune open LLMs with LoRA/QLoRA from YAML recipes.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)


data_app = typer.Typer(help="Look at a recipe's data before training.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@app.callback()
def main() -> None:
    """Fine-tune open LLMs with LoRA/QLoRA from YAML recipes."""


@app.command()
def train(
    recipe_path: Path = typer.Argument(..., metavar="RECIPE.yaml", help="The recipe to run (see recipes/)."),
    overrides: Optional[list[str]] = typer.Option(None, "--set", metavar="SECTION.KEY=VALUE",
                                                  help="Override one recipe field; repeatable, e.g. --set train.max_steps=10."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output folder (overrides output.dir)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate the recipe, files and every dataset row without loading weights."),
    as_json: bool = typer.Option(False, "--json", help="Print only one JSON summary line at the end (for CI jobs)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint of an interrupted "
                                "(or finished) run into the same output folder; starts afresh when there is none."),
    gpus: int = typer.Option(1, "--gpus", metavar="N", help="Train with N processes on this machine, one per GPU, "
                             "as `torchrun --nproc-per-node N -m ftcli train` would (N processes on the CPU where "
                             "there is no CUDA GPU); batch_size counts rows per process."),
) -> None:
    """Validate the recipe, load and patch the model, train, and save the adapter folder."""
    console = _console(stderr=as_json)
    with _reported_errors("train", as_json):
        from ftcli.distributed import start_processes, stop_processes
        from ftcli.launch import check_process_count, run_workers, train_workers
        from ftcli.output import check_output_free, locked_output_folder
        from ftcli.progress import TrainingDisplay
        from ftcli.recipe import load_recipe
        from ftcli.signals import StopRequest
        from ftcli import train as training

        device = check_process_count(gpus)
        recipe = load_recipe(recipe_path, overrides)  # a bad recipe gets one message here, not one per process
        if gpus > 1 and not dry_run:
            if device == "cpu":
                console.print(f"No CUDA GPU here: the {gpus} processes train on the CPU (gloo).", highlight=False)
            workers = train_workers(_train_arguments(recipe_path, overrides, output, as_json, resume), gpus)
            raise typer.Exit(run_workers(workers))
        if output:
            recipe.output.dir = str(output)
        final = Path(recipe.output.dir)
        if dry_run:
            summary = training.dry_run(recipe, gpus)
            check_output_free(final, recipe.output.overwrite)
            _finish(console, summary, as_json)
            return
        processes = start_processes()
        if processes.main:
            with StopRequest() as stop, locked_output_folder(final, recipe.output.overwrite, resume) as staging:
                summary = training.run(recipe, staging, TrainingDisplay(console, enabled=not as_json), resume, stop,
                                       processes)
            summary["output"] = str(final)
            _finish(console, summary, as_json)
        else:  # the other processes train alongside process 0, which alone reads and writes the output folder
            with StopRequest(announce=False) as stop:
                training.run(recipe, None, TrainingDisplay(console, enabled=False), resume, stop, processes)
        stop_processes()


@app.command()
def plan(
    recipe_path: Path = typer.Argument(..., metavar="RECIPE.yaml", help="The recipe to estimate."),
    overrides: Optional[list[str]] = typer.Option(None, "--set", metavar="SECTION.KEY=VALUE",
                                                  help="Override one recipe field; repeatable."),
    gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", metavar="SIZE",
                                             help="Say whether the run fits a GPU of this size, e.g. 16GiB, 24GB, "
                                             "80GiB (default: this machine's GPU, if it has one)."),
    gpus: int = typer.Option(1, "--gpus", metavar="N", help="Plan a run on N GPUs, one process each: the per-GPU "
                             "peak of ddp and fsdp, and which one train.distributed: auto picks."),
    host_memory: Optional[str] = typer.Option(None, "--host-memory", metavar="SIZE", help="CPU memory the offloaded "
                                              "layer inputs may take, pinned (default: what this machine has "
                                              "available now)."),
    longest: bool = typer.Option(False, "--longest", help="Also find the longest max_seq_length, in steps of 1,024 "
                                 "tokens at the recipe's batch_size, that fits the GPU and the host memory."),
    as_json: bool = typer.Option(False, "--json", help="Print the estimate as one JSON line."),
) -> None:
    """Estimate peak GPU memory, steps and tokens of a recipe before any weight is loaded."""
    console = _console(stderr=as_json)
    with _reported_errors("plan", as_json):
        from ftcli import plan as planning
        from ftcli.recipe import load_recipe

        recipe = load_recipe(recipe_path, overrides)
        budget = planning.parse_size(gpu_memory) if gpu_memory else None
        host_budget = planning.parse_size(host_memory, "--host-memory") if host_memory else planning.local_host_memory()
        estimate = planning.plan_recipe(recipe, budget, gpus, host_budget, longest)
        if as_json:
            _print_json(estimate.summary())
        else:
            console.print(estimate.report(), highlight=False)
        if estimate.fits is False:
            raise typer.Exit(planning.DOES_NOT_FIT_EXIT_CODE)


@data_app.command("preview")
def data_preview(
    recipe_path: Path = typer.Argument(..., metavar="RECIPE.yaml", help="The recipe whose data to show."),
    count: int = typer.Option(3, "-n", "--count", min=0, help="How many training examples to print."),
    overrides: Optional[list[str]] = typer.Option(None, "--set", metavar="SECTION.KEY=VALUE",
                                                  help="Override one recipe field; repeatable."),
) -> None:
    """Print training examples as the model sees them (masked part dimmed, trained part highlighted) and
    token-length statistics, without loading weights."""
    with _reported_errors("data preview", as_json=False):
        from ftcli.data.preview import preview_data
        from ftcli.recipe import load_recipe

        preview_data(load_recipe(recipe_path, overrides), count, _console())


@app.command()
def chat(
    out: Optional[Path] = typer.Argument(None, metavar="[OUT]", help="An output folder of `ftcli train`, a merged or "
                                         "Hugging Face model folder, or a .gguf file (default: the newest finished run "
                                         "under ./outputs)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Answer this once, print only the answer, and exit."),
    system: Optional[str] = typer.Option(None, "--system", help="A system message to start the conversation with."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", min=1, help="Longest answer, in tokens."),
    temperature: float = typer.Option(0.7, "--temperature", min=0.0, help="Sampling temperature; 0 always picks the "
                                      "most likely token (the same answer every time)."),
    top_p: float = typer.Option(0.9, "--top-p", min=0.0, max=1.0,
                                help="Sample from the likeliest tokens holding this much probability."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for sampling, to repeat an answer."),
    base: Optional[Path] = typer.Option(None, "--base", help="Base model of an adapter folder, instead of the one its "
                                        "recipe.yaml names."),
    compile: bool = typer.Option(True, "--compile/--no-compile", help="On a GPU, decode with a compiled step replayed "
                                 "as a CUDA graph (compiles on the first answer)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP),
) -> None:
    """Talk to a trained model: a terminal session with history, or one answer with --prompt."""
    with _reported_errors("chat", as_json=False):
        from ftcli.chat import run
        from ftcli.decoding import Sampling
        from ftcli.output import run_folder_or_newest

        run(run_folder_or_newest(out), prompt, system, Sampling(max_new_tokens, temperature, top_p), base, compile, seed,
            trust_remote_code)


@app.command()
def export(
    out_dir: Optional[Path] = typer.Argument(None, metavar="[OUT]", help="A training output folder (the adapter `ftcli "
                                             "train` wrote; default: the newest finished run under ./outputs)."),
    merged: bool = typer.Option(False, "--merged", help="Write the base model with the LoRA merged: 16-bit safetensors in Hugging Face layout."),
    gguf_types: Optional[str] = typer.Option(None, "--gguf", metavar="TYPES",
                                             help="Write GGUF files of these types, comma-separated: f32, f16, bf16, q8_0, q4_0, q4_k_m, q5_k_m, q6_k."),
    to: Optional[Path] = typer.Option(None, "--to", metavar="DIR", help="Folder for the exports (default OUT-export, "
                                      "beside OUT)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace exports that already exist."),
    as_json: bool = typer.Option(False, "--json", help="Print only one JSON summary line at the end."),
    check: bool = typer.Option(True, "--check/--no-check", help="Check each GGUF file against the trained model on "
                               "a sample of the run's data: weights, top tokens, greedy answers, chat template and "
                               "stop tokens; writes DIR/check.json. A broken template, stop token or tensor exits 1."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP),
) -> None:
    """Export a trained adapter: a copy of the adapter (no flags), a merged model, or GGUF files for llama.cpp and Ollama."""
    console = _console(stderr=as_json)
    with _reported_errors("export", as_json):
        from ftcli.export import export as run_export
        from ftcli.export.check import check_failure, check_report
        from ftcli.output import run_folder_or_newest

        summary = run_export(run_folder_or_newest(out_dir), merged=merged, gguf_types=gguf_types, to=to,
                             overwrite=overwrite, trust_remote_code=trust_remote_code, check=check)
        failure = check_failure(summary["check"]) if "check" in summary else None
        if as_json:  # one line with the check's numbers, and the error where it failed
            if failure:
                summary |= {"status": "error", "exit_code": failure.exit_code, "message": failure.message}
            _print_json(summary)
            if failure:
                raise typer.Exit(failure.exit_code)
            return
        for name, output in summary["outputs"].items():
            size = f", {output['bytes'] / 2**20:,.1f} MiB" if "bytes" in output else ""
            console.print(f"[green]{name}[/] -> [bold]{output['path']}[/]{size} ({output['seconds']:.1f} s)")
        if "check" in summary:
            console.print(check_report(summary["check"]), highlight=False)
        if failure:
            raise failure


def _train_arguments(recipe_path: Path, overrides: Optional[list[str]], output: Optional[Path], as_json: bool,
                     resume: bool) -> list[str]:
    """`ftcli train`'s command line again, from its parsed options, without --gpus: what each worker runs."""
    arguments = [str(recipe_path)]
    for override in overrides or []:
        arguments += ["--set", override]
    if output:
        arguments += ["--output", str(output)]
    return arguments + ["--json"] * as_json + ["--resume"] * resume


def _finish(console: Console, summary: dict, as_json: bool) -> None:
    if as_json:
        _print_json(summary)
        return
    if summary.get("dry_run") and summary["method"] == "grpo":  # prompts: nothing is trained on them as they are
        console.print(f"[green]Recipe is valid.[/] {summary['architecture']} model; {summary['rows']} rows -> "
                      f"{summary['train_examples']} training / {summary['eval_examples']} eval prompts, "
                      f"{summary['tokens']:,} prompt tokens, longest {summary['longest']}, {summary['skipped_invalid']} "
                      f"invalid rows skipped; {summary['steps']} optimizer steps.")
        return
    if summary.get("dry_run"):
        console.print(f"[green]Recipe is valid.[/] {summary['architecture']} model; {summary['rows']} rows -> "
                      f"{summary['train_examples']} training / {summary['eval_examples']} eval examples, "
                      f"{summary['tokens']:,} tokens ({summary['target_tokens']:,} trained), longest "
                      f"{summary['longest']}, {summary['truncated']} truncated, {summary['dropped_no_target']} "
                      f"dropped with nothing to learn, {summary['skipped_invalid']} invalid rows skipped; "
                      f"{summary['steps']} optimizer steps.")
        return
    last = (f"final reward {summary['final_reward']:.4f}" if "final_reward" in summary
            else f"final loss {summary['final_loss']:.4f}")
    console.print(f"[green]Done.[/] {summary['steps']} steps, {last}, "
                  f"{summary['tokens_per_s']:,.0f} tokens/s, peak memory {summary['peak_mem_gib']:.2f} GiB. "
                  f"Adapter saved to [bold]{summary['output']}[/].")


class _RedactedStream:
    """A text stream that passes what is written through `redact`: every line ftcli prints (the header, summaries,
    reports, paths), not only its error messages. Rich writes each print whole, so no secret is split between writes."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        return self._stream.write(redact(text))

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _console(stderr: bool = False) -> Console:
    return Console(file=_RedactedStream(sys.stderr if stderr else sys.stdout))


def _print_json(record: dict) -> None:
    print(redact(json.dumps(record)))


def _quiet_libraries() -> None:
    """Keep the terminal to ftcli's own header and bar: the libraries' load bars and notices are noise there."""
    import logging
    import warnings

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("datasets").setLevel(logging.CRITICAL)  # ftcli reports unreadable data itself, by line
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.utils.checkpoint")
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


@contextmanager
def _reported_errors(command: str, as_json: bool) -> Iterator[None]:
    """Turn any failure into one coloured, redacted paragraph (and a JSON line with --json) and its exit code:
    ftcli's own errors with their fix, anything else through `unexpected_error`. The traceback only with
    FTCLI_DEBUG=1."""
    try:
        _quiet_libraries()
        yield
    except typer.Exit:  # a command's own exit code, such as plan's "does not fit"
        raise
    except (Exception, KeyboardInterrupt) as caught:
        error = caught if isinstance(caught, FtcliError) else unexpected_error(caught, command)
        process = int(os.environ.get("RANK", "0"))  # of several, started by torchrun or --gpus
        if isinstance(error, PeerStopped) and not debugging() or process and not error.can_be_one_process_alone:
            raise typer.Exit(error.exit_code) from None  # process 0 reports what all processes met alike
        if process:
            error.message = f"(process {process}) {error.message}"
        console = _console(stderr=True)
        if debugging():
            console.print(redacted_traceback(caught), highlight=False, markup=False, soft_wrap=True)
        # a Text, not markup: a message quotes code and data, where [i] or [/] are not styles
        console.print(Text.assemble(("error:", "bold red"), " ", error.message), highlight=False, soft_wrap=True)
        if as_json:
            _print_json({"status": "error", "exit_code": error.exit_code, "message": error.message})
        raise typer.Exit(error.exit_code) from None
