"""Committed documentation that is generated from code must match what the code generates now."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cli.main import main

REPO = Path(__file__).resolve().parents[2]
MARKER = "<!-- generated below this line by `make docs`"


def test_configuration_reference_is_current(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config-reference"]) == 0
    generated = capsys.readouterr().out
    text = (REPO / "docs" / "configuration.md").read_text()
    head, marker, rest = text.partition(MARKER)
    assert marker, f"docs/configuration.md lost its marker line ({MARKER}...)"
    committed = rest.split("\n", 1)[1].lstrip("\n")
    assert committed == generated, "docs/configuration.md is stale: run `make docs` and commit it"
    assert head.startswith("# Configuration reference")
