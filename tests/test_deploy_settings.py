"""Every ``BINDSEARCH_*`` setting is documented in docs/deploy.md and reaches compose's service.

A setting added to ``service.settings.ServiceSettings`` without a row in the deploy table, or
without a line in ``docker-compose.yml``'s ``x-serve-env`` (which passes it on when set), fails
here; so does a documented variable that nothing reads.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from service.settings import ServiceSettings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "docs" / "deploy.md"
COMPOSE = ROOT / "docker-compose.yml"
# Read outside ServiceSettings: serve's --host/--port, the weights cache, the demo index size.
OTHERS = {"BINDSEARCH_HOST", "BINDSEARCH_PORT", "BINDSEARCH_CACHE", "BINDSEARCH_DEMO_SAMPLES"}
# Set per service by compose itself (device) or testing only (random weights).
NOT_PASSED_ON = {"BINDSEARCH_DEVICE", "BINDSEARCH_RANDOM_WEIGHTS"}


def settings_variables() -> set[str]:
    prefix = str(ServiceSettings.model_config.get("env_prefix", ""))
    assert prefix == "BINDSEARCH_"
    return {prefix + name.upper() for name in ServiceSettings.model_fields}


def table_variables() -> set[str]:
    """The first column of docs/deploy.md's "Settings" table."""
    text = DEPLOY.read_text(encoding="utf-8")
    section = text.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(BINDSEARCH_[A-Z_]+)` \|", section, re.M))


def test_every_setting_is_in_the_deploy_table() -> None:
    documented = table_variables()
    wanted = settings_variables() | OTHERS
    assert not wanted - documented, f"not in docs/deploy.md's table: {sorted(wanted - documented)}"
    assert not documented - wanted, f"documented but read by nothing: {documented - wanted}"


def test_compose_passes_every_setting_on() -> None:
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    passed = set(compose["x-serve-env"])
    wanted = settings_variables() - NOT_PASSED_ON | {"BINDSEARCH_DEMO_SAMPLES"}
    assert not wanted - passed, f"not in x-serve-env: {sorted(wanted - passed)}"
    assert not passed - wanted, f"in x-serve-env, read by nothing: {passed - wanted}"
    for service in ("bindsearch-cpu", "bindsearch-gpu"):
        assert compose["services"][service]["environment"]["BINDSEARCH_DEVICE"]


def test_settings_table_defaults_match_the_code() -> None:
    """The table's defaults for the plain numeric settings are the code's."""
    text = DEPLOY.read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `(BINDSEARCH_[A-Z_]+)` \| `([0-9.]+)` \|", text, re.M))
    assert len(rows) >= 10, rows
    fields = ServiceSettings.model_fields
    for var, shown in rows.items():
        name = var.removeprefix("BINDSEARCH_").lower()
        if name in fields:
            assert float(fields[name].default) == float(shown), (var, shown)
