"""A real Prometheus, configured from docker/prometheus.yml, scrapes a live API + worker and reads fgs_jobs_total
back."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from fgs_common.loopback import free_port
from support.live_calls import JobState, generate, wait_final
from support.stack import start_stack

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
SCRAPE_CONFIG = Path(__file__).resolve().parent.parent / "docker" / "prometheus.yml"

pytestmark = pytest.mark.skipif(
    not Path(PROMETHEUS).exists(), reason="needs the prometheus binary (Debian package `prometheus`)"
)


def loopback_config(api: str) -> dict:
    """docker/prometheus.yml with only the targets' host:port (and the scrape interval) changed.

    Workers serve no port: their metrics travel through Redis to the API's /metrics.
    """
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    for job in config["scrape_configs"]:
        host_port = {"fgs-api": api}[job["job_name"]]
        for static in job["static_configs"]:
            static["targets"] = [host_port]
    return config


def query(base: str, expression: str) -> list[dict]:
    response = httpx.get(f"{base}/api/v1/query", params={"query": expression}, timeout=5)
    response.raise_for_status()
    body = response.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_scrapes_fgs_jobs_total(redis_server, tiny_model_dir, tmp_path):
    stack = start_stack(redis_server, tiny_model_dir, tmp_path / "stack", workers=1)
    prometheus = None
    try:
        with stack.client("alpha") as client:
            job_id = generate(client)
            assert wait_final(client, job_id, timeout=60).state is JobState.finished

        api = stack.base_url.removeprefix("http://")
        config_file = tmp_path / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(loopback_config(api)))
        port = free_port()
        log = open(tmp_path / "prometheus.log", "wb")
        prometheus = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=log,
        )
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 45
        result: list[dict] = []
        while time.time() < deadline:
            assert prometheus.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            try:
                result = query(base, 'fgs_jobs_total{job="fgs-api",tenant="alpha",status="finished"}')
            except httpx.HTTPError:  # not listening yet
                result = []
            if result:
                break
            time.sleep(0.5)
        assert result, (
            "Prometheus never scraped fgs_jobs_total; log: " + (tmp_path / "prometheus.log").read_text()[-3000:]
        )
        assert float(result[0]["value"][1]) == 1.0
        assert result[0]["metric"]["instance"] == api
        # the worker's own series reach Prometheus through Redis and the API
        heartbeats = query(base, 'fgs_worker_heartbeats_total{job="fgs-api"}')
        assert heartbeats and float(heartbeats[0]["value"][1]) > 0
    finally:
        if prometheus is not None and prometheus.poll() is None:
            prometheus.terminate()
            try:
                prometheus.wait(timeout=15)
            except subprocess.TimeoutExpired:
                prometheus.kill()
        stack.close()
