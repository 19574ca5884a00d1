"""What a run records about itself: metrics.jsonl, TensorBoard event files, and a loss curve.

metrics.jsonl gets one JSON object per logged step, flushed at once so that a CI job can tail it and a
killed run keeps every row it logged; a number that is not finite (a gradient norm that overflowed in float16)
is written as null, so every line is strict JSON. A resumed run first drops the rows after its checkpoint
(they will be computed again, and a kill may have cut the last one short) and then appends. TensorBoard
(recipe `output.tensorboard`) and loss.png (when matplotlib is installed: the `plot` extra) are for people who
would rather look than read.
"""

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ftcli.errors import RecipeError
from ftcli.staging import atomic_write_bytes, atomic_write_text

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_FOLDER = "tensorboard"
PLOT_FILE = "loss.png"
NOT_PLOTTED = ("step", "tokens", "elapsed_s")  # the axes, not curves


@dataclass
class StepResult:
    """What a training method reports of one optimizer step's backward."""

    loss: float  # the step's loss: mean over its target tokens (SFT) or its pairs (preference methods)
    tokens: int  # tokens the step computed
    metrics: dict[str, float] = field(default_factory=dict)  # the method's own, such as DPO's rewards


class MetricsLog:
    def __init__(self, folder: Path, tensorboard: bool, resume_step: int = 0):
        path = folder / METRICS_FILE
        if resume_step and path.is_file():
            atomic_write_text(path, "".join(json_line(row) for row in read_rows(path) if row["step"] <= resume_step))
        elif path.exists():
            path.unlink()
        self.file = path.open("a")
        self.writer = None
        if tensorboard:
            try:  # here, not at the top: tensorboard is an optional extra
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RecipeError("output.tensorboard is true but the tensorboard package is not installed; "
                                  "pip install 'ftcli[tensorboard]', or set output.tensorboard: false.") from None
            # purge_step hides the events a resumed run is about to write again
            self.writer = SummaryWriter(str(folder / TENSORBOARD_FOLDER), purge_step=resume_step + 1 if resume_step else None)

    def write(self, row: dict) -> None:
        self.file.write(json_line(row))
        self.file.flush()
        if self.writer:
            for name, value in row.items():
                if name not in NOT_PLOTTED and value is not None and math.isfinite(value):
                    tag = f"eval/{name.removeprefix('eval_')}" if name.startswith("eval_") else f"train/{name}"
                    self.writer.add_scalar(tag, value, row["step"])
            self.writer.flush()

    def close(self) -> None:
        self.file.close()
        if self.writer:
            self.writer.close()

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def json_line(row: dict) -> str:
    """The row as one line of strict JSON: NaN and infinity, which it has no words for, become null."""
    finite = {name: None if isinstance(value, float) and not math.isfinite(value) else value
              for name, value in row.items()}
    return json.dumps(finite, allow_nan=False) + "\n"


def read_rows(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a line that does not parse (cut short by a kill) is left out."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def plot_losses(folder: Path) -> Optional[Path]:
    """Draw the training (and evaluation) loss from metrics.jsonl into loss.png; None without matplotlib."""
    try:  # here, not at the top: matplotlib is an optional extra
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_rows(folder / METRICS_FILE)
    train = [(row["step"], row["loss"]) for row in rows if row.get("loss") is not None]
    evaluation = [(row["step"], row["eval_loss"]) for row in rows if row.get("eval_loss") is not None]
    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        axes.plot(*zip(*train), label="training loss", linewidth=1.2)
    if evaluation:
        axes.plot(*zip(*evaluation), "o-", label="evaluation loss")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (mean per target token)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png")
    plt.close(figure)
    path = folder / PLOT_FILE
    atomic_write_bytes(path, image.getvalue())
    return path
