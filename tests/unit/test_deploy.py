"""The deployment files: docker-compose.yml against the Compose Specification's JSON
Schema (no Docker engine needed), the Procfile through honcho's own parser, and the
Prometheus and Grafana files they point to."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from processors.cli import PROCESSORS

ROOT = Path(__file__).resolve().parents[2]
PROCESSOR_TYPES = [p for p in PROCESSORS if p != "all"]


def compose() -> dict[str, object]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_docker_compose_follows_the_compose_specification() -> None:
    schema = json.loads((ROOT / "deploy/compose-spec.schema.json").read_text())
    jsonschema.Draft201909Validator(schema).validate(compose())


def test_a_broken_compose_file_is_caught_by_the_schema() -> None:
    schema = json.loads((ROOT / "deploy/compose-spec.schema.json").read_text())
    broken = compose()
    broken["services"]["appender"]["depends_on"] = "redis"  # type: ignore[index]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft201909Validator(schema).validate(broken)


def test_compose_runs_every_processor_with_metrics_and_mounts_files_that_exist() -> None:
    services = compose()["services"]
    assert isinstance(services, dict)
    for name in PROCESSOR_TYPES:
        command = services[name]["command"]
        assert command[:3] == ["memstream", "run", name]
        assert "--metrics-port" in command
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = {
        t for c in prometheus["scrape_configs"] for s in c["static_configs"] for t in s["targets"]
    }
    assert targets == {f"{name}:9464" for name in PROCESSOR_TYPES} | {"gateway:8080"}
    gateway = services["gateway"]["command"]
    assert gateway[:2] == ["memstream", "gateway"] and gateway[-2:] == ["--port", "8080"]


def test_the_procfile_has_one_process_type_per_processor_and_all() -> None:
    from honcho.environ import parse_procfile

    procfile = parse_procfile((ROOT / "Procfile").read_text())
    assert list(procfile.processes) == [*PROCESSOR_TYPES, "all", "gateway"]
    for name, command in procfile.processes.items():
        prefix = "memstream gateway " if name == "gateway" else f"memstream run {name} "
        assert command.startswith(prefix)


def test_the_alert_rules_are_well_formed() -> None:
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert rule["alert"].startswith("Memstream")
            assert rule["expr"] and rule["annotations"]["summary"]
            assert rule["labels"]["severity"] in ("warning", "critical")
