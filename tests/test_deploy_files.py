"""docker-compose.yml and the Dockerfile stay valid and complete: every command parses, every file exists."""

from __future__ import annotations

import importlib
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())


def freshtower_services() -> dict[str, list[str]]:
    """The ``python -m`` arguments of each service on the freshtower image (entrypoint ``python -m``)."""
    image = COMPOSE["x-freshtower"]["image"]
    return {
        name: s["command"]
        for name, s in COMPOSE["services"].items()
        if s.get("image") == image and "entrypoint" not in s
    }


def python_m_commands(script: str) -> list[list[str]]:
    """The argument lists of every ``python -m PACKAGE ...`` line of a shell script or command line."""
    out = []
    for line in script.splitlines():
        words = shlex.split(line.strip())
        if words[:1] == ["exec"]:
            words = words[1:]
        if "-m" in words and words and words[0].endswith("python"):
            out.append(words[words.index("-m") + 1 :])
    return out


def assert_parses(argv: list[str], where: str) -> None:
    package, *rest = argv
    parser = importlib.import_module(f"{package}.__main__").build_parser()
    args = parser.parse_args(rest)  # exits (SystemExit) on an unknown flag or a missing argument
    assert callable(args.run), where


def test_every_freshtower_service_command_parses():
    services = freshtower_services()
    assert {"worker", "publisher", "archive", "compact-archive", "trainer", "replay", "serving"} <= set(services)
    for name, command in services.items():
        assert_parses(command, name)


def worker_scaled_script() -> str:
    return COMPOSE["services"]["worker-scaled"]["command"][0]


@pytest.mark.parametrize("service", ["worker-scaled", "publisher-changelog"])
def test_scale_out_commands_parse(service):
    if service == "worker-scaled":
        (command,) = python_m_commands(worker_scaled_script())
    else:
        command = COMPOSE["services"][service]["command"]
    assert_parses(command, service)


def test_the_single_worker_set_stays_the_default_and_scale_out_is_a_profile():
    services = COMPOSE["services"]
    for name in ("worker", "publisher", "serving"):
        assert "profiles" not in services[name], name
    assert services["worker"]["command"][services["worker"]["command"].index("--state-dir") + 1] == "/data/worker"
    scaled = {name for name, s in services.items() if "scale-out" in s.get("profiles", [])}
    assert scaled == {"worker-scaled", "publisher-changelog", "serving-scaled"}
    worker = services["worker-scaled"]
    # `--scale worker-scaled=N` needs replicas that differ: no fixed name, no host port.
    assert "container_name" not in worker and "ports" not in worker
    assert worker["environment"]["FRESHTOWER_USER_STATE"] == "changelog"
    assert worker["environment"]["FRESHTOWER_ITEM_ROWS"] == "owner"  # the changelog mode requires it
    # Its state is on its own anonymous volume (one per replica), not on the shared one.
    assert "/state" in worker["volumes"]
    (command,) = python_m_commands(worker_scaled_script())
    assert command[command.index("--state-dir") + 1].startswith("/state/")
    assert "--own-items" in command
    publisher = services["publisher-changelog"]["command"]
    assert publisher[publisher.index("--source") + 1] == "changelog" and "--mirror-state" in publisher
    assert services["serving-scaled"]["depends_on"] == {"publisher-changelog": {"condition": "service_started"}}
    # Prometheus (prometheus.compose.yml) and the alerts find them under the single set's names.
    for name, alias in (
        ("worker-scaled", "worker"),
        ("publisher-changelog", "publisher"),
        ("serving-scaled", "serving"),
    ):
        assert services[name]["networks"]["default"]["aliases"] == [alias], name


def test_each_worker_replica_keeps_one_member_id_of_its_own(tmp_path):
    """The replica's start script, run with a stand-in for python: the member id is drawn once per state volume."""
    from streaming.settings import load_settings
    from streaming.worker_settings import WorkerSettings

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "python"
    stub.write_text('#!/bin/sh\necho "$FRESHTOWER_WORKER_INSTANCE_ID"\n')
    stub.chmod(0o755)
    script = worker_scaled_script().replace("$$", "$")  # compose's escape of a literal $

    def start(volume: Path) -> str:
        volume.mkdir(exist_ok=True)
        done = subprocess.run(
            ["/bin/sh", "-c", script.replace("/state", str(volume))],
            env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    first = start(tmp_path / "replica-1")
    assert re.fullmatch(r"worker-[0-9a-f]{12}", first), first
    assert start(tmp_path / "replica-1") == first  # a restart or a recreated container: the same member
    assert start(tmp_path / "replica-2") != first  # another replica: another member
    settings = load_settings(WorkerSettings, section="worker", environ={"FRESHTOWER_WORKER_INSTANCE_ID": first})
    assert settings.member_id() == first


def test_the_scheduled_nightly_service_runs_compaction_then_the_retrain():
    nightly = COMPOSE["services"]["nightly"]
    assert nightly["entrypoint"] == ["/bin/sh", "-c"] and nightly["restart"] == "unless-stopped"
    commands = python_m_commands(nightly["command"][0])
    assert [c[:2] for c in commands] == [["streaming", "compact-archive"], ["trainer", "full"]]
    for command in commands:
        assert_parses(command, "nightly")
    # Its wait is real Python: it computes the next 01:30 UTC.
    wait = re.search(r"python -c '([^']+)'", nightly["command"][0]).group(1)
    compile(wait.replace("time.sleep(", "print("), "<nightly wait>", "exec")


UNITS = REPO / "deploy" / "systemd"


def test_systemd_units_pass_systemd_analyze_verify(tmp_path):
    """The units as an operator installs them, with /srv/freshtower pointing at this checkout."""
    verify = shutil.which("systemd-analyze")
    assert verify, "systemd-analyze is missing (Debian package systemd)"
    for unit in UNITS.iterdir():
        text = unit.read_text().replace("/srv/freshtower", str(REPO)).replace("User=freshtower", "User=root")
        (tmp_path / unit.name).write_text(text)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "freshtower-archive.service", "freshtower-nightly.service", "freshtower-nightly.timer",
        "freshtower-publisher.service", "freshtower-serving.service", "freshtower-worker.service",
    ]  # fmt: skip
    done = subprocess.run(
        [verify, "verify", "--man=no", *names], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and not done.stderr.strip(), done.stdout + done.stderr
    calendar = re.search(r"^OnCalendar=(.+)$", (UNITS / "freshtower-nightly.timer").read_text(), re.M).group(1)
    done = subprocess.run([verify, "calendar", calendar], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "01:30:00 UTC" in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize("unit", ["worker", "archive", "publisher"])
def test_long_running_units_restart_on_a_stall_but_not_on_a_refusal(unit):
    text = (UNITS / f"freshtower-{unit}.service").read_text()
    # 69 (Kafka unusable for now) restarts; 77 (credentials refused) does not; 143 is a stop forced after 8 s.
    assert re.search(r"^Restart=on-failure$", text, re.M)
    assert re.search(r"^RestartPreventExitStatus=77$", text, re.M)
    assert re.search(r"^SuccessExitStatus=143$", text, re.M)
    stop = int(re.search(r"^TimeoutStopSec=(\d+)$", text, re.M).group(1))
    assert stop > 8  # the processes' own forced exit comes first
    (command,) = python_m_commands(re.search(r"^ExecStart=(.+)$", text, re.M).group(1))
    assert_parses(command, unit)


def test_the_serving_unit_parses_and_restarts_on_failure():
    text = (UNITS / "freshtower-serving.service").read_text()
    assert re.search(r"^Restart=on-failure$", text, re.M)
    (command,) = python_m_commands(re.search(r"^ExecStart=(.+)$", text, re.M).group(1))
    assert command[:2] == ["serving", "run"]
    assert_parses(command, "serving")


def test_the_nightly_unit_runs_compaction_then_the_retrain():
    text = (UNITS / "freshtower-nightly.service").read_text()
    pre = python_m_commands(re.search(r"^ExecStartPre=(.+)$", text, re.M).group(1))
    main = python_m_commands(re.search(r"^ExecStart=(.+)$", text, re.M).group(1))
    assert [c[:2] for c in pre + main] == [["streaming", "compact-archive"], ["trainer", "full"]]
    for command in pre + main:
        assert_parses(command, "nightly")


def test_the_kubernetes_cronjob_is_valid_against_the_api_schema():
    import kubernetes_validate

    manifest = yaml.safe_load((REPO / "deploy" / "k8s" / "nightly-cronjob.yaml").read_text())
    kubernetes_validate.validate(manifest, kubernetes_validate.latest_version(), strict=True)
    spec = manifest["spec"]
    assert spec["schedule"].split() == ["30", "1", "*", "*", "*"] and spec["timeZone"] == "Etc/UTC"
    assert spec["concurrencyPolicy"] == "Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    steps = [c["args"] for c in pod["initContainers"] + pod["containers"]]
    assert [s[:2] for s in steps] == [["streaming", "compact-archive"], ["trainer", "full"]]
    for args in steps:
        assert_parses(args, "cronjob")
    # A manifest with a misspelt field is refused: the check is not vacuous.
    pod["containerz"] = pod.pop("containers")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(manifest, kubernetes_validate.latest_version(), strict=True)


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
    jobs = prometheus["scrape_configs"]
    targets = {t for job in jobs for c in job.get("static_configs", []) for t in c["targets"]}
    targets |= {f"{name}:{c['port']}" for job in jobs for c in job.get("dns_sd_configs", []) for name in c["names"]}
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
