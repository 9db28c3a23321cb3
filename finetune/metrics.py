"""What a run reports: loss and throughput between two metrics events, and output_dir/metrics.csv.

Counts and losses only, never a training row.  The CSV becomes the job's result file (the worker stores it
for the user), so a resumed run rewrites it to hold each step once.
"""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path
from typing import Any

__all__ = ["MetricsFile", "Window"]

_PRIVATE_FILE = 0o600
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
    """output_dir/metrics.csv: a row per logged or validated step; a resumed run drops rows past its step."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def open(self, *, keep_until_step: int) -> None:
        rows: list[dict[str, str]] = []
        if keep_until_step and self.path.is_file():
            with self.path.open(newline="") as fh:
                rows = [row for row in csv.DictReader(fh) if int(row["step"]) <= keep_until_step]
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _PRIVATE_FILE)
        with os.fdopen(fd, "w", newline="") as fh:
            writer = csv.DictWriter(fh, _METRICS_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a", newline="") as fh:
            csv.DictWriter(fh, _METRICS_COLUMNS).writerow(row)
