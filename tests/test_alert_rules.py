"""The Prometheus configuration, alert rules and Grafana dashboard, checked with ``promtool``.

``promtool check config`` / ``check rules`` parse everything; ``promtool test rules`` runs the
hand-written series of ``deploy/prometheus/alerts_test.yml`` through the rules. The dashboard's
PromQL is checked by the same parser: every panel query becomes a recording rule in a temporary
rules file. Metric names are checked against the list the processes export.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_server import find_binary

from trainer.monitor import JOB, end_registry, start_registry

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "freshtower.json"

# The metric names freshtower's processes export (worker, publisher, archive sink, serving).
SCALARS = {
    "freshtower_events_consumed_total",
    "freshtower_examples_trained_total",
    "freshtower_sgd_skipped_steps_total",
    "freshtower_dead_letters_total",
    "freshtower_consumer_lag",
    "freshtower_event_watermark_timestamp_seconds",
    "freshtower_embedding_rows",
    "freshtower_checkpoint_timestamp_seconds",
    "freshtower_progress_timestamp_seconds",
    "freshtower_kafka_errors_total",
    "freshtower_model_info",
    "freshtower_model_data_cutoff_timestamp_seconds",
    "freshtower_model_created_timestamp_seconds",
    "freshtower_model_switches_total",
    "freshtower_publish_last_success_timestamp_seconds",
    "freshtower_published_watermark_timestamp_seconds",
    "freshtower_published_version",
    "freshtower_publish_interval_seconds",
    "freshtower_published_rows_total",
    "freshtower_publish_failures_total",
    "freshtower_requests_total",
    "freshtower_served_model_info",
    "freshtower_served_publish_version",
    "freshtower_served_watermark_timestamp_seconds",
    "freshtower_served_freshness_seconds",
    "freshtower_index_items",
    "freshtower_index_build_seconds",
    "freshtower_snapshot_swaps_total",
    "freshtower_serving_latency_target_seconds",
    "freshtower_archive_events_total",
    "freshtower_archive_skipped_total",
    "freshtower_archive_flush_timestamp_seconds",
    "freshtower_archive_watermark_timestamp_seconds",
    "freshtower_item_owner_lag",
}
# What the nightly job pushes (trainer.monitor): every metric of a start and of a fully detailed end.
NIGHTLY = {
    metric.name
    for registry in (
        start_registry(0.0),
        end_registry(
            "promoted",
            started_s=0.0,
            now_s=1.0,
            examples=1,
            mean_loss=1.0,
            data_cutoff_ms=0,
            recall_k=1,
            candidate={},
            current={},
            id_rows={},
            expired={},
        ),
    )
    for metric in registry.collect()
}
HISTOGRAMS = {
    "freshtower_sgd_step_seconds",
    "freshtower_publish_duration_seconds",
    "freshtower_request_seconds",
    "freshtower_request_stage_seconds",
}
KNOWN_SERIES = SCALARS | NIGHTLY | {h + suffix for h in HISTOGRAMS for suffix in ("_bucket", "_count", "_sum")}
METRIC_NAME = re.compile(r"\bfreshtower_[a-z0-9_]+")
# Grafana's built-in interval variables, given a sample value so the expression parses as PromQL.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}


def promtool(*args: str | Path, cwd: Path = PROMETHEUS_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [find_binary("promtool"), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (
        f"{' '.join(result.args)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
    )


def test_prometheus_config_is_valid() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert_ok(result)
    # check config also parsed the rule file it names: "SUCCESS: 1 rule files found"
    assert "1 rule files found" in result.stdout


def test_alert_rules_are_valid() -> None:
    assert_ok(promtool("check", "rules", "alerts.yml"))


def test_alert_rules_unit_tests_pass() -> None:
    assert_ok(promtool("test", "rules", "alerts_test.yml"))


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    rules = (PROMETHEUS_DIR / "alerts.yml").read_text()
    tests = (PROMETHEUS_DIR / "alerts_test.yml").read_text()
    defined = set(re.findall(r"^\s*- alert: (\w+)$", rules, re.MULTILINE))
    quiet = set(re.findall(r"alertname: (\w+)\n\s*exp_alerts: \[\]", tests))
    firing = set(re.findall(r"alertname: (\w+)\n\s*exp_alerts:\n\s*- exp_labels:", tests))
    assert len(defined) == 21, sorted(defined)
    assert defined - quiet == set(), "alerts without a case where they stay quiet"
    assert defined - firing == set(), "alerts without a case where they fire"
    assert (quiet | firing) - defined == set(), "tests of alerts that do not exist"


def test_rules_and_config_agree_on_job_names() -> None:
    rules = (PROMETHEUS_DIR / "alerts.yml").read_text()
    config = (PROMETHEUS_DIR / "prometheus.yml").read_text()
    jobs = set(re.findall(r"job_name: (\S+)", config))
    named = set(re.findall(r'job="([^"]+)"', rules))
    assert named == {"freshtower-worker", "freshtower-publisher", "freshtower-serving", JOB}
    # The nightly job's label comes from its pushes, kept by a scrape job that honours labels.
    scraped = named - {JOB}
    assert scraped <= jobs, f"alerts.yml names jobs {sorted(scraped - jobs)} that prometheus.yml does not scrape"
    assert re.search(r"job_name: freshtower-pushgateway\n    honor_labels: true\n", config)
    assert re.search(r"^rule_files:\n  - alerts.yml$", config, re.MULTILINE)


def test_alert_rules_reference_only_exported_metrics() -> None:
    names = set(METRIC_NAME.findall((PROMETHEUS_DIR / "alerts.yml").read_text()))
    assert names - KNOWN_SERIES == set()
    # Every alert-worthy signal of the list is watched.
    assert {
        "freshtower_published_watermark_timestamp_seconds",
        "freshtower_publish_last_success_timestamp_seconds",
        "freshtower_publish_interval_seconds",
        "freshtower_consumer_lag",
        "freshtower_dead_letters_total",
        "freshtower_event_watermark_timestamp_seconds",
        "freshtower_checkpoint_timestamp_seconds",
        "freshtower_progress_timestamp_seconds",
        "freshtower_model_data_cutoff_timestamp_seconds",
        "freshtower_archive_watermark_timestamp_seconds",
        "freshtower_full_outcome",
        "freshtower_full_running",
        "freshtower_full_last_start_timestamp_seconds",
        "freshtower_served_publish_version",
        "freshtower_serving_latency_target_seconds",
    } <= names


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # a collapsed row holds its panels


def dashboard_queries() -> dict[str, str]:
    """``{"<panel title> / <refId>": PromQL}`` with Grafana's interval variables substituted."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = {}
    for panel in _panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            queries[f"{panel['title']} / {target['refId']}"] = expr
    return queries


def check_expressions(exprs: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``promtool check rules`` over the expressions, each as a recording rule (JSON is valid YAML)."""
    rules = {
        "groups": [{"name": "check", "rules": [{"record": f"check:expr_{i}", "expr": e} for i, e in enumerate(exprs)]}]
    }
    path = tmp_path / "exprs.yml"
    path.write_text(json.dumps(rules))
    return promtool("check", "rules", path, cwd=tmp_path)


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    queries = dashboard_queries()
    assert len(queries) == 40
    leftover = {k: q for k, q in queries.items() if "$" in q}
    assert leftover == {}, "dashboard variables the check does not know"
    result = check_expressions(list(queries.values()), tmp_path)
    assert_ok(result)
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


def test_expression_check_rejects_broken_promql(tmp_path: Path) -> None:
    # The dashboard check above is only worth something if promtool rejects bad PromQL this way.
    result = check_expressions(["sum by (topic) (rate(freshtower_events_consumed_total[1m])"], tmp_path)
    assert result.returncode != 0
    assert "unclosed left parenthesis" in result.stdout + result.stderr


def test_dashboard_references_only_exported_metrics() -> None:
    queries = dashboard_queries()
    names = {name for q in queries.values() for name in METRIC_NAME.findall(q)}
    assert names - KNOWN_SERIES == set()
    # What a person opens the dashboard for: freshness, publish age, lag, throughput, latencies.
    exprs = "\n".join(queries.values())
    for needed in (
        "time() - freshtower_published_watermark_timestamp_seconds",
        "time() - freshtower_publish_last_success_timestamp_seconds",
        "freshtower_consumer_lag",
        "rate(freshtower_events_consumed_total[1m])",
        "histogram_quantile(0.99, sum by (le) (rate(freshtower_sgd_step_seconds_bucket[1m])))",
        "histogram_quantile(0.99, sum by (le) (rate(freshtower_request_seconds_bucket[1m])))",
        "time() - freshtower_model_data_cutoff_timestamp_seconds",
        "time() - freshtower_full_last_success_timestamp_seconds",
        "time() - freshtower_archive_watermark_timestamp_seconds",
        "freshtower_full_holdout_recall",
        "freshtower_served_freshness_seconds",
        "freshtower_index_items",
    ):
        assert needed in exprs, needed


def test_dashboard_panels_use_the_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource"]
    ids = [p["id"] for p in _panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in _panels(dashboard["panels"]):
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
