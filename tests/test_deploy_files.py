"""docker-compose.yml and the Dockerfile stay valid and complete: every command parses, every file exists."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())


def freshtower_services() -> dict[str, list[str]]:
    image = COMPOSE["x-freshtower"]["image"]
    return {name: s["command"] for name, s in COMPOSE["services"].items() if s.get("image") == image}


def test_every_freshtower_service_command_parses():
    services = freshtower_services()
    assert {"worker", "publisher", "archive", "compact-archive", "trainer", "replay", "serving"} <= set(services)
    for name, command in services.items():
        package, *argv = command
        parser = importlib.import_module(f"{package}.__main__").build_parser()
        args = parser.parse_args(argv)  # exits (SystemExit) on an unknown flag or a missing argument
        assert callable(args.run), name


def test_mounted_files_and_image_sources_exist():
    for service in COMPOSE["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).is_file(), f"{source} is mounted but missing"
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (.+?) \S+$", dockerfile, flags=re.M):
        for part in source.split():
            assert (REPO / part).exists(), f"the Dockerfile copies {part}, which is missing"


@pytest.mark.parametrize("service", ["worker", "publisher", "archive", "serving"])
def test_metrics_ports_match_the_compose_prometheus_targets(service):
    prometheus = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.compose.yml").read_text())
    targets = {t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    command = freshtower_services()[service]
    port = command[command.index("--metrics-port") + 1]
    assert f"{service}:{port}" in targets


def test_trainer_pushes_to_the_gateway_prometheus_scrapes() -> None:
    prometheus = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.compose.yml").read_text())
    (job,) = [j for j in prometheus["scrape_configs"] if j["job_name"] == "freshtower-pushgateway"]
    assert job["honor_labels"] is True  # the alerts match the pushes' job="freshtower-full"
    command = freshtower_services()["trainer"]
    gateway = command[command.index("--pushgateway") + 1]
    assert job["static_configs"][0]["targets"] == [gateway]
    assert gateway.split(":")[0] in COMPOSE["services"]
