"""docker-compose.yml, Dockerfile and .env.example agree with the code they deploy.

No Docker here: the files are parsed and checked against the Typer app (every
`billing ...` a service runs exists, options included) and against `Settings`
(every variable a service is given is one the app or the image reads).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from billing.config import Settings
from billing.search_attributes import SEARCH_ATTRIBUTES
from tooling.cli.main import app

ROOT = Path(__file__).resolve().parents[2]
APP_SERVICES = {"migrate", "worker", "api", "stripe-emulator"}
EXPECTED_SERVICES = APP_SERVICES | {
    "postgres",
    "temporal",
    "temporal-ui",
    "temporal-search-attributes",
}

# Variables the official images document, by image name.
IMAGE_VARIABLES = {
    "postgres": {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"},
    "temporalio/auto-setup": {
        "DB",
        "DB_PORT",
        "POSTGRES_SEEDS",
        "POSTGRES_USER",
        "POSTGRES_PWD",
        "DEFAULT_NAMESPACE",
    },
    "temporalio/ui": {"TEMPORAL_ADDRESS", "TEMPORAL_CORS_ORIGINS"},
    "temporalio/admin-tools": {"TEMPORAL_ADDRESS"},
}

# docs/contracts.md, "Environment".
DESIGN_VARIABLES = {
    "DATABASE_URL",
    "TEMPORAL_ADDRESS",
    "TEMPORAL_NAMESPACE",
    "TEMPORAL_TASK_QUEUE",
    "AUTH_JWT_SECRET",
    "STRIPE_SECRET_KEY",
    "STRIPE_WEBHOOK_SECRET",
    "STRIPE_PRICE_ID",
    "STRIPE_USERS_PRICE_ID",
    "STRIPE_REQUESTS_PRICE_ID",
    "STRIPE_USERS_DIMENSION",
    "STRIPE_REQUESTS_DIMENSION",
    "STRIPE_TRIAL_DAYS",
    "STRIPE_ALLOW_PROMOTION_CODES",
    "STRIPE_AUTOMATIC_TAX",
    "STRIPE_API_BASE",
    "STRIPE_PORTAL_RETURN_URL",
    "STRIPE_REQUESTS_PER_SECOND",
}

SECRET_NAME = re.compile(r"PASSWORD|PWD|SECRET|_KEY$|TOKEN")
INTERPOLATION = re.compile(r"^\$\{[A-Z_]+(:?[-?][^}]*)?\}$")

SETTINGS_VARIABLES = {name.upper() for name in Settings.model_fields}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


def _image_name(service: dict[str, Any]) -> str:
    return str(service.get("image", "")).split(":")[0]


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _env_example() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def test_service_names(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == EXPECTED_SERVICES
    assert services["stripe-emulator"]["profiles"] == ["emulator"]
    assert "profiles" not in services["api"]


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_every_billing_command_exists(services: dict[str, dict[str, Any]], name: str) -> None:
    command = services[name]["command"]
    assert isinstance(command, list) and command[0] == "billing", command

    result = CliRunner().invoke(app, [*command[1:], "--help"])

    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_images_and_commands_of_app_services(services: dict[str, dict[str, Any]]) -> None:
    assert services["api"]["command"][1:] == ["api", "--host", "0.0.0.0", "--port", "8000"]
    assert services["worker"]["command"][1:] == ["worker"]
    assert services["migrate"]["command"][1:] == ["migrate"]
    for name in APP_SERVICES:
        assert services[name]["build"] == "."
    assert _image_name(services["postgres"]) == "postgres"
    assert _image_name(services["temporal"]) == "temporalio/auto-setup"
    assert _image_name(services["temporal-ui"]) == "temporalio/ui"
    assert _image_name(services["temporal-search-attributes"]) == "temporalio/admin-tools"


def test_temporal_runs_on_the_compose_postgres(services: dict[str, dict[str, Any]]) -> None:
    env = _environment(services["temporal"])

    assert env["DB"] == "postgres12"
    assert env["POSTGRES_SEEDS"] == "postgres"
    assert env["DB_PORT"] == "5432"
    assert _environment(services["temporal-ui"])["TEMPORAL_ADDRESS"] == "temporal:7233"
    script = " ".join(services["temporal-search-attributes"]["command"])
    for attribute in SEARCH_ATTRIBUTES:
        assert attribute in script
    assert "search-attribute create" in script and "--type Keyword" in script


# Only the API must be reachable from outside the host (Stripe delivers webhooks to it).
PUBLIC_SERVICES = {"api"}
LOOPBACK = {"127.0.0.1", "::1"}


def _published(service: dict[str, Any]) -> list[tuple[str | None, str]]:
    """(host address, container port) of each published port; None means every interface."""
    found: list[tuple[str | None, str]] = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):  # long syntax
            found.append((entry.get("host_ip") or None, str(entry["target"])))
            continue
        parts = str(entry).rsplit(":", 2)  # [address:][host port:]container port
        address = parts[0].strip("[]") if len(parts) == 3 else None
        found.append((address or None, parts[-1]))
    return found


def test_published_port_parsing() -> None:
    """The parser behind the next test reads every syntax compose accepts the way compose does."""
    service = {
        "ports": [
            "7233",
            "7233:7233",
            "0.0.0.0:8080:8080",
            "127.0.0.1:8233:8233",
            "[::1]:9000:9000",
            {"target": 80, "published": 8080},
            {"target": 81, "host_ip": "127.0.0.1", "published": 8081},
        ]
    }
    assert _published(service) == [
        (None, "7233"),
        (None, "7233"),
        ("0.0.0.0", "8080"),
        ("127.0.0.1", "8233"),
        ("::1", "9000"),
        (None, "80"),
        ("127.0.0.1", "81"),
    ]


def test_temporal_and_everything_but_the_api_listen_on_loopback_only(
    services: dict[str, dict[str, Any]],
) -> None:
    """Whoever reaches the Temporal frontend or UI can signal, reset and terminate every
    org workflow: they are published on 127.0.0.1 (or not at all), never on all interfaces."""
    for name in ("temporal", "temporal-ui"):
        for address, port in _published(services[name]):
            assert address in LOOPBACK, f"{name} publishes {port} on {address or 'every interface'}"
    for name, service in services.items():
        assert service.get("network_mode") != "host", f"{name} shares the host's network"
        if name in PUBLIC_SERVICES:
            continue
        for address, port in _published(service):
            assert address in LOOPBACK, f"{name} publishes {port} on {address or 'every interface'}"


def test_every_variable_is_read_by_someone(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        env = set(_environment(service))
        if name in APP_SERVICES:
            assert env <= SETTINGS_VARIABLES, (name, env - SETTINGS_VARIABLES)
        else:
            documented = IMAGE_VARIABLES[_image_name(service)]
            assert env <= documented, (name, env - documented)


def test_env_example_lists_the_design_and_nothing_unknown() -> None:
    example = set(_env_example())

    assert example >= DESIGN_VARIABLES, DESIGN_VARIABLES - example
    assert example <= SETTINGS_VARIABLES | IMAGE_VARIABLES["postgres"]
    assert not (ROOT / ".env").exists() or ".env" in (ROOT / ".gitignore").read_text()


def test_env_example_holds_no_secret_values() -> None:
    for key, value in _env_example().items():
        if SECRET_NAME.search(key) and key != "POSTGRES_PASSWORD":
            assert value == "", key


def test_depends_on_waits_for_health_or_completion(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        if name not in ("postgres", "stripe-emulator"):
            assert depends, f"{name} starts without waiting for anything"
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions"
        for target, rule in depends.items():
            condition = rule["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{target} has no healthcheck"
            else:
                assert condition == "service_completed_successfully", (name, target, condition)
                assert services[target].get("restart") == "no", f"{target} is not one-shot"
    assert services["worker"]["depends_on"]["migrate"]["condition"] == (
        "service_completed_successfully"
    )
    assert services["worker"]["depends_on"]["temporal-search-attributes"]["condition"] == (
        "service_completed_successfully"
    )
    for name in ("postgres", "temporal", "api", "stripe-emulator"):
        assert "healthcheck" in services[name], name


def test_no_inline_secrets(services: dict[str, dict[str, Any]]) -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    assert not re.search(r"sk_(test|live)_|whsec_|rk_(test|live)_", text)
    for name, service in services.items():
        for key, value in _environment(service).items():
            if SECRET_NAME.search(key):
                assert INTERPOLATION.match(value), f"{name}: {key} is written inline"
            if key == "DATABASE_URL":
                assert "${POSTGRES_PASSWORD" in value, f"{name}: database password inline"
        if name in APP_SERVICES - {"stripe-emulator"}:
            assert service["env_file"] == ".env", name


def test_dockerfile_builds_a_non_root_image() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    lines = dockerfile.splitlines()
    instructions = [line.split()[0] for line in lines if line and line[0].isupper()]

    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.M)
    assert re.search(r"pip install \.", dockerfile)
    user = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert user and user[-1] not in ("root", "0")
    assert instructions.index("USER") > instructions.index("RUN")
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".env" in ignored and ".venv" in ignored and ".git" in ignored
