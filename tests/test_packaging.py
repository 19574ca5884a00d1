"""What installing ftcli brings: its top-level import names, the dependency ranges it declares, and what the
README's first command installs.

The wheel is built from a copy of the source tree (setuptools builds in place and would leave build/ behind),
without build isolation, so no download is needed.
"""

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# What the code calls, by the oldest release that has it: a floor below one of these installs a version that breaks
NEEDED = {
    "gguf": ("0.18.0", "GGUFWriter.add_sliding_window_pattern and add_rope_freq_base_swa (Gemma 3 export)"),
    "transformers": ("5.0", "only 5.x was tested (configs' rope_parameters, StaticCache(config, max_cache_len))"),
}
# Dependencies whose next major release may break what ftcli uses (the 8-bit optimizer reuses bitsandbytes'
# private step; patch.py subclasses peft's LoRA layers; transformers' modeling modules are patched)
CEILINGED = ["transformers", "peft", "bitsandbytes"]


def requirements() -> dict[str, Requirement]:
    return {Requirement(line).name: Requirement(line) for line in PYPROJECT["project"]["dependencies"]}


def built_wheel(tmp_path: Path) -> Path:
    copy = tmp_path / "source"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "models",
                                                                "outputs"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", tmp_path / "dist", copy], check=True)
    return next((tmp_path / "dist").glob("ftcli-*.whl"))


def test_wheel_provides_only_ftcli_and_ftcli_kernels(tmp_path):
    """PyPI's `kernels` is Hugging Face's kernel hub: ftcli must not install (or shadow) a top-level `kernels`."""
    with zipfile.ZipFile(built_wheel(tmp_path)) as wheel:
        top_level = {name.split("/")[0] for name in wheel.namelist()}
    assert {name for name in top_level if not name.endswith(".dist-info")} == {"ftcli", "ftcli_kernels"}


def test_nothing_imports_a_top_level_kernels_package():
    stale = re.compile(r"(^|[^\w.])((import|from|-m) kernels\b|kernels/\w+\.py)")
    sources = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    offenders = [f"{path}:{number}" for path in sources
                 if path.endswith((".py", ".md", ".toml", ".yaml", ".sh")) and (ROOT / path).is_file()
                 for number, line in enumerate((ROOT / path).read_text().splitlines(), 1) if stale.search(line)]
    assert offenders == []


def test_dependency_floors_cover_what_the_code_calls():
    declared = requirements()
    for name, (oldest, reason) in NEEDED.items():
        floors = [Version(spec.version) for spec in declared[name].specifier if spec.operator == ">="]
        assert floors and floors[0] >= Version(oldest), f"{name} needs >= {oldest}: {reason}"


def test_dependencies_have_a_ceiling_at_the_next_major_version():
    declared = requirements()
    for name in CEILINGED:
        floor = next(Version(spec.version) for spec in declared[name].specifier if spec.operator == ">=")
        assert f"<{floor.major + 1}" in {str(spec) for spec in declared[name].specifier}, name


def test_installed_versions_are_inside_the_declared_ranges():
    """The environment running these tests is one of the tested ones: its versions must be admitted."""
    for name, requirement in requirements().items():
        if requirement.marker is None or requirement.marker.evaluate():
            assert requirement.specifier.contains(version(name), prereleases=True), (name, version(name))


def test_first_readme_command_installs_no_extra():
    """The quickstart trains; the test extra compiles llama.cpp (minutes) and is for the test command only."""
    first_command = re.search(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S).group(1)
    assert re.search(r"pip install [^&]*-e \.(\s|$)", first_command), first_command
    assert "[test]" not in first_command
    assert not any(requirement.startswith("llama-cpp-python") for requirement in PYPROJECT["project"]["dependencies"])
