"""load_settings: auth.metrics_access is checked, and the retired auth.metrics_public is refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.core.settings import METRICS_ACCESS, AuthSettings, load_settings


def test_metrics_access_defaults_to_loopback() -> None:
    assert load_settings(env={}).auth.metrics_access == "loopback"


@pytest.mark.parametrize("access", METRICS_ACCESS)
def test_metrics_access_from_file_and_env(tmp_path: Path, access: str) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(f'[auth]\nmetrics_access = "{access}"\n')
    assert load_settings(str(config), env={}).auth.metrics_access == access
    assert load_settings(env={"GATEWAY_AUTH__METRICS_ACCESS": access}).auth.metrics_access == access


@pytest.mark.parametrize("bad", ["open", "Loopback", "", "true"])
def test_an_unknown_metrics_access_is_an_error(bad: str) -> None:
    with pytest.raises(ValueError, match=r"auth\.metrics_access must be one of loopback, token, public"):
        load_settings(env={"GATEWAY_AUTH__METRICS_ACCESS": bad})
    with pytest.raises(ValueError, match="metrics_access"):
        AuthSettings(metrics_access=bad)


@pytest.mark.parametrize("value", ["true", "false"])
def test_the_retired_metrics_public_names_its_replacement(tmp_path: Path, value: str) -> None:
    """Not silently ignored: `metrics_public = false` would otherwise open /metrics to loopback."""
    config = tmp_path / "gateway.toml"
    config.write_text(f"[auth]\nmetrics_public = {value}\n")
    with pytest.raises(ValueError, match=r"auth\.metrics_public .* replaced by auth\.metrics_access"):
        load_settings(str(config), env={})
    with pytest.raises(ValueError, match=r"GATEWAY_AUTH__METRICS_PUBLIC\) is no longer read"):
        load_settings(env={"GATEWAY_AUTH__METRICS_PUBLIC": value})
