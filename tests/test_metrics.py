"""metrics.jsonl: strict JSON on every line, and a resumed run's view of a file a kill cut short."""

import json

from ftcli.metrics import METRICS_FILE, MetricsLog


def strict_rows(path):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_numbers_that_are_not_finite_are_written_as_null(tmp_path):
    with MetricsLog(tmp_path, tensorboard=False) as metrics:
        metrics.write({"step": 1, "loss": 2.5, "grad_norm": float("inf")})
        metrics.write({"step": 2, "loss": 2.0, "grad_norm": float("nan")})
    assert strict_rows(tmp_path / METRICS_FILE) == [{"step": 1, "loss": 2.5, "grad_norm": None},
                                                    {"step": 2, "loss": 2.0, "grad_norm": None}]


def test_resuming_keeps_the_rows_up_to_the_checkpoint_and_drops_a_line_cut_by_a_kill(tmp_path):
    (tmp_path / METRICS_FILE).write_text('{"step": 1, "loss": 3.0, "grad_norm": NaN}\n{"step": 2, "loss": 2.0}\n'
                                         '{"step": 3, "loss": 1.0}\n{"step": 4, "lo')
    with MetricsLog(tmp_path, tensorboard=False, resume_step=2) as metrics:
        metrics.write({"step": 3, "loss": 1.5})
    assert strict_rows(tmp_path / METRICS_FILE) == [{"step": 1, "loss": 3.0, "grad_norm": None},
                                                    {"step": 2, "loss": 2.0}, {"step": 3, "loss": 1.5}]
