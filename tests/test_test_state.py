"""The suite keeps its state in its temporary folders and conftest's TEST_CACHE, never under HOME."""

import os
import subprocess
import sys

from conftest import ROOT

# A training run (datasets' cache, matplotlib's loss plot, transformers) and a Triton kernel in the interpreter
TOUCHING_CACHES = ["tests/test_cli.py::test_train_writes_a_complete_adapter_folder",
                   "tests/test_kernel_rms_norm.py::test_frozen_weight_gets_no_gradient"]


def test_a_run_leaves_home_untouched(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TOUCHING_CACHES],
                            cwd=ROOT, env={**os.environ, "HOME": str(home)}, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(str(path.relative_to(home)) for path in home.rglob("*")) == []
