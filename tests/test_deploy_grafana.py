"""The Grafana dashboard draws only metrics sumfleet exports, with the labels they carry."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import Metric
from prometheus_client.metrics import MetricWrapperBase

from models import metrics

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "sumfleet-dashboard.json"
FLEET = {  # read at scrape by FleetCollector: name -> labels
    "sumfleet_queue_documents": {"model"},
    "sumfleet_jobs": {"model", "state"},
    "sumfleet_unfinished_batches": {"model"},
    "sumfleet_queue_messages": {"queue"},
    "sumfleet_webhook_deliveries": {"state"},
    "sumfleet_live_workers": {"model"},
}
SUFFIXES = ("_total", "_bucket", "_sum", "_count")


def exported() -> dict[str, set[str]]:
    """Every series name the workers and the API export, with its labels (`le` for buckets)."""
    found = dict(FLEET)
    for value in vars(metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        for family in value.describe():
            assert isinstance(family, Metric)
            labels = set(value._labelnames)
            found[family.name] = labels
            for suffix in SUFFIXES:
                found[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return found


def test_dashboard_uses_only_exported_metrics_and_their_labels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    known = exported()
    titles = {panel["title"] for panel in dashboard["panels"]}
    assert {"Throughput (documents/s)", "Backlog (documents) and messages", "Failures", "Live workers"} <= titles
    assert any("latency" in title for title in titles)
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for name in re.findall(r"\b(sumfleet_[a-z_]+)", expr):
                assert name in known, f"{panel['title']}: {name} is not exported"
                used.add(name)
                for group in re.findall(r"by \(([^)]*)\)", expr):
                    wanted = {g.strip() for g in group.split(",")}
                    names = set(re.findall(r"\b(sumfleet_[a-z_]+)", expr))
                    assert any(wanted <= known[n] for n in names), f"{panel['title']}: by ({group})"
    assert {"sumfleet_documents_total", "sumfleet_queue_documents", "sumfleet_live_workers"} <= used
