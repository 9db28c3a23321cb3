"""What a run reports: loss and throughput between two metrics events, and output_dir/metrics.csv.

Counts and losses only, never a training row.  The CSV becomes the job's result file (the worker stores it
for the user), so a resumed run holds each step once.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

from contracts.blobs import Sealer

__all__ = ["MetricsFile", "Window"]

_METRICS_COLUMNS = ("step", "train_loss", "valid_loss", "learning_rate", "tokens_per_second")


class Window:
    """Loss and throughput since the last metrics event."""

    def __init__(self) -> None:
        self.tokens = self.learned = 0
        self.loss_sum = self.seconds = 0.0
        self._started = 0.0

    def start(self) -> None:
        self._started = time.perf_counter()

    def add(self, tokens: int, loss_sum: float, learned: int) -> None:
        self.seconds += time.perf_counter() - self._started
        self.tokens += tokens
        self.loss_sum += loss_sum
        self.learned += learned

    def loss(self) -> float:
        return self.loss_sum / self.learned

    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class MetricsFile:
    """output_dir/metrics.csv: a row per logged or validated step, held in memory while the run trains (each
    checkpoint carries the rows so far, so a resumed run keeps them and holds each step once) and written,
    sealed like the checkpoints, when the run ends."""

    def __init__(self, path: Path, sealer: Sealer) -> None:
        self.path, self.sealer = path, sealer
        self.rows: list[dict[str, Any]] = []

    def resume(self, rows: list[dict[str, Any]], *, until_step: int) -> None:
        self.rows = [row for row in rows if int(row["step"]) <= until_step]

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append(dict(row))

    def save(self) -> Path:
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, _METRICS_COLUMNS)
        writer.writeheader()
        writer.writerows(self.rows)
        self.sealer.encrypt_stream([text.getvalue().encode()], self.path)
        return self.path
