"""Constants and helpers shared across modules have one definition each; a copy would drift from it unnoticed."""

import re
import subprocess

from conftest import ROOT

THIS_FILE = "tests/test_single_definitions.py"  # its patterns would find themselves
SOURCES = [path for path in subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "*.py"], cwd=ROOT,
                                           capture_output=True, text=True, check=True).stdout.split()
           if path != THIS_FILE]


def places(pattern: str) -> list[str]:
    """The source files where `pattern` (a regex; a space in it stands for any whitespace) occurs."""
    compiled = re.compile(pattern.replace(" ", r"\s*"), re.M)
    return sorted(path for path in SOURCES if (ROOT / path).is_file() and compiled.search((ROOT / path).read_text()))


def test_the_logits_chunk_size_is_defined_once():
    assert places(r"^ LOGITS_CHUNK_BYTES =") == ["ftcli_kernels/limits.py"]


def test_the_kernel_dtypes_are_listed_once():
    assert places(r"\(torch\.float32, torch\.bfloat16, torch\.float16\)") == ["ftcli_kernels/limits.py"]


def test_the_seven_lora_targets_are_listed_once():
    """The recipe's default, and the recipe test's expectation of it."""
    seven = r'\[ "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj" \]'
    assert places(seven) == ["ftcli/recipe.py", "tests/test_recipe.py"]


def test_test_helpers_are_defined_once():
    assert places(r"^def relative_error\(") == ["ftcli_kernels/accuracy.py"]
    assert places(r"^DEVICE = ") == ["tests/conftest.py"]
    assert places(r"^def randomise\(") == ["tests/conftest.py"]
    assert places(r"^def make_(output|adapter)_folder\(") == ["tests/conftest.py"]  # what `ftcli train` leaves
    assert places(r'if "lora_B" in name:') == []  # an inline copy of randomise
