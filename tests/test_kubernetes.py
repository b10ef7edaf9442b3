"""deploy/kubernetes: every manifest validates against the current Kubernetes schemas (kubernetes-validate, strict:
no unknown field), the ServiceMonitor against the Prometheus Operator's model, and the pieces are wired to each
other: selectors match labels, ports match by name and number, the fleet's DNS name is the headless Service's, the
GPU limit matches the node selector, Prometheus labels each sidecar with its node, the dashboard's ConfigMap is the
generated dashboard and every one of its queries selects the node."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from support.helpers import ROOT

DEPLOY = ROOT / "deploy" / "kubernetes"
NAMESPACE = "model-orchestrator"


def _docs() -> list[dict]:
    docs = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append({**doc, "_file": str(path.relative_to(DEPLOY))})
    return docs


def _one(kind: str, name: str) -> dict:
    [doc] = [d for d in _docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _env(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def test_every_manifest_validates_against_the_current_kubernetes_schemas():
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    docs = [d for d in _docs() if d["apiVersion"] != "monitoring.coreos.com/v1"]
    assert {d["kind"] for d in docs} >= {"Namespace", "Service", "DaemonSet", "Deployment", "NetworkPolicy",
                                         "ConfigMap", "PersistentVolumeClaim"}
    for doc in docs:
        clean = {k: v for k, v in doc.items() if k != "_file"}
        try:
            kubernetes_validate.validate(clean, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['_file']} {doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): {exc}")


def test_a_wrong_field_is_caught():
    """The validation above can fail: a typo in a field or a string for a number is refused."""
    import kubernetes_validate

    ds = {k: v for k, v in _one("DaemonSet", "model-orchestrator").items() if k != "_file"}
    bad = json.loads(json.dumps(ds))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, kubernetes_validate.latest_version(), strict=True)
    bad = json.loads(json.dumps(ds))
    bad["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "120"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, kubernetes_validate.latest_version(), strict=True)


def _service_monitor_unknown_fields(doc: dict) -> list[str]:
    """Fields of the manifest the Prometheus Operator's ServiceMonitor model does not know (it ignores them)."""
    from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

    parsed = ServiceMonitor.model_validate(doc).model_dump(by_alias=True, exclude_unset=True)

    def walk(given, known, path):
        if isinstance(given, dict):
            missing = [f"{path}.{k}" for k in given if not isinstance(known, dict) or k not in known]
            return missing + [m for k, v in given.items() if isinstance(known, dict) and k in known
                              for m in walk(v, known[k], f"{path}.{k}")]
        if isinstance(given, list):
            return [m for i, (g, k) in enumerate(zip(given, known)) for m in walk(g, k, f"{path}[{i}]")]
        return []

    return walk(doc, parsed, "")


def test_the_service_monitor_validates_against_the_prometheus_operator_model():
    sm = {k: v for k, v in _one("ServiceMonitor", "model-orchestrator").items() if k != "_file"}
    assert _service_monitor_unknown_fields(sm) == []
    typo = json.loads(json.dumps(sm))
    typo["spec"]["endpoints"][0]["relabeling"] = typo["spec"]["endpoints"][0].pop("relabelings")
    assert _service_monitor_unknown_fields(typo) == [".spec.endpoints[0].relabeling"]


def test_everything_is_in_the_namespace():
    docs = _docs()
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"] == [NAMESPACE]
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == NAMESPACE, (d["_file"], d["kind"])


def test_sidecars_headless_service_and_fleet_are_wired():
    svc, ds = _one("Service", "model-orchestrator"), _one("DaemonSet", "model-orchestrator")
    pod = ds["spec"]["template"]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is False
    assert _matches(svc["spec"]["selector"], pod["metadata"]["labels"])
    assert _matches(ds["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
    [container] = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    [sport] = svc["spec"]["ports"]
    assert ports[sport["targetPort"]] == sport["port"] == 8000
    env = _env(container)
    # the sidecars find each other by the headless Service's DNS name, on the port they listen on
    assert env["MODEL_ORCHESTRATOR_FLEET"]["value"] == f"{svc['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
    assert int(env["MODEL_ORCHESTRATOR_PORT"]["value"]) == ports["http"]
    assert env["MODEL_ORCHESTRATOR_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(ports["http"])
    # the drain runs before SIGTERM, and the whole stop fits in the grace period
    drain = container["lifecycle"]["preStop"]["exec"]["command"]
    assert drain[:2] == ["model-orchestrator", "drain"]
    from model_orchestrator.cli import shutdown_bound_s
    from model_orchestrator.platform.settings import Settings
    assert pod["spec"]["terminationGracePeriodSeconds"] >= float(drain[drain.index("--drain-timeout") + 1]) + \
        shutdown_bound_s(Settings())
    # the mounts are where the image keeps the model cache and the state (llama-cpp-service/Dockerfile)
    dockerfile = (ROOT / "llama-cpp-service" / "Dockerfile").read_text()
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert f"HF_HOME={mounts['hf-cache']}" in dockerfile and f"MODEL_ORCHESTRATOR_STATE={mounts['state']}" in dockerfile
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["hf-cache"]["hostPath"]["type"] == "DirectoryOrCreate"  # one model cache per node


def test_gpus_all_of_a_node_to_its_one_sidecar():
    for ds in (d for d in _docs() if d["kind"] == "DaemonSet"):
        spec = ds["spec"]["template"]["spec"]
        [container] = spec["containers"]
        count = spec["nodeSelector"]["nvidia.com/gpu.count"]
        assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == count, ds["metadata"]["name"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]


def test_secret_keys_are_the_ones_the_readme_creates():
    readme = (ROOT / "README.md").read_text()
    create = re.search(r"kubectl -n model-orchestrator create secret generic model-orchestrator(.*?)\n\n", readme, re.S)
    assert create, "README: the kubectl command that creates the Secret"
    documented = set(re.findall(r"--from-literal=([\w-]+)=", create.group(1)))
    used = {e["valueFrom"]["secretKeyRef"]["key"] for d in _docs() if d["kind"] in ("DaemonSet", "Deployment")
            for c in d["spec"]["template"]["spec"]["containers"] for e in c.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {}) and e["valueFrom"]["secretKeyRef"]["name"] == "model-orchestrator"}
    assert used == documented == {"api-key", "n8n-encryption-key"}


def test_n8n_reaches_the_fleet_with_the_package_installed():
    n8n, svc = _one("Deployment", "n8n"), _one("Service", "model-orchestrator")
    pod = n8n["spec"]["template"]
    [container] = pod["spec"]["containers"]
    env = _env(container)
    overwrite = json.loads(env["CREDENTIALS_OVERWRITE_DATA"]["value"].replace("$(MODEL_ORCHESTRATOR_API_KEY)", "k"))
    base = overwrite["modelOrchestratorApi"]["baseUrl"]
    assert base == f"http://{svc['metadata']['name']}.{NAMESPACE}.svc.cluster.local:{svc['spec']['ports'][0]['port']}"
    names = [e["name"] for e in container["env"]]
    assert names.index("MODEL_ORCHESTRATOR_API_KEY") < names.index("CREDENTIALS_OVERWRITE_DATA")  # $(...) expands
    pkg = json.loads((ROOT / "n8n-nodes" / "package.json").read_text())
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["community-package"] == f"{mounts['data']}/nodes/node_modules/{pkg['name']}"
    [init] = pod["spec"]["initContainers"]
    assert init["image"].endswith(f"/n8n-nodes:{pkg['version']}") or init["image"].endswith(f"n8n-nodes:{pkg['version']}")
    dockerfile = (DEPLOY / "n8n-nodes.Dockerfile").read_text()
    assert "COPY n8n-nodes/dist /package/dist" in dockerfile and init["command"][-2:] == ["/package/.", "/target/"]
    assert {m["name"]: m["mountPath"] for m in init["volumeMounts"]}["community-package"] == "/target"
    assert container["image"] == "n8nio/n8n:" + re.search(r"n8nio/n8n:([\d.]+)", (ROOT / "compose.yml").read_text())[1]
    n8n_svc = _one("Service", "n8n")
    assert _matches(n8n_svc["spec"]["selector"], pod["metadata"]["labels"])


def test_only_n8n_and_prometheus_reach_the_sidecars():
    policy = _one("NetworkPolicy", "model-orchestrator-sidecars")
    sidecar_pod = _one("DaemonSet", "model-orchestrator")["spec"]["template"]
    n8n_pod = _one("Deployment", "n8n")["spec"]["template"]
    assert _matches(policy["spec"]["podSelector"]["matchLabels"], sidecar_pod["metadata"]["labels"])
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    [rule] = policy["spec"]["ingress"]
    n8n_peer, prom_peer = rule["from"]
    assert set(n8n_peer) == {"podSelector"} and _matches(n8n_peer["podSelector"]["matchLabels"],
                                                         n8n_pod["metadata"]["labels"])
    assert set(prom_peer) == {"namespaceSelector", "podSelector"}  # both in one peer: AND, not OR
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert not _matches(n8n_peer["podSelector"]["matchLabels"], sidecar_pod["metadata"]["labels"])


def _dashboard_module():
    spec = importlib.util.spec_from_file_location("build_dashboard", ROOT / "grafana" / "build_dashboard.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_prometheus_labels_each_sidecar_with_its_node():
    board = _dashboard_module()
    svc = _one("Service", "model-orchestrator")
    sm = _one("ServiceMonitor", "model-orchestrator")
    assert _matches(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    [endpoint] = sm["spec"]["endpoints"]
    assert endpoint["port"] == svc["spec"]["ports"][0]["name"] and endpoint["path"] == "/metrics"
    assert svc["metadata"]["name"] == board.JOB  # the ServiceMonitor's job label: the Service's name
    assert {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"} in endpoint["relabelings"]
    scrape = yaml.safe_load(_one("ConfigMap", "model-orchestrator-scrape")["data"]["scrape-config.yml"])
    [job] = scrape["scrape_configs"]
    assert job["job_name"] == board.JOB
    assert {"source_labels": ["__meta_kubernetes_pod_node_name"], "target_label": "node"} in job["relabel_configs"]
    keep = {tuple(r["source_labels"]): r["regex"] for r in job["relabel_configs"] if r.get("action") == "keep"}
    pod = _one("DaemonSet", "model-orchestrator")["spec"]["template"]["metadata"]
    assert keep[("__meta_kubernetes_pod_annotation_prometheus_io_scrape",)] == pod["annotations"]["prometheus.io/scrape"]
    assert keep[("__meta_kubernetes_pod_label_app_kubernetes_io_component",)] == pod["labels"]["app.kubernetes.io/component"]


def test_scrape_config_passes_promtool(tmp_path):
    promtool = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)
    if not promtool:
        pytest.skip("promtool is not installed (apt-get install prometheus; tests/test_grafana.py installs it)")
    # Debian's promtool is built without Kubernetes discovery: the job is checked with static targets in its place
    scrape = yaml.safe_load(_one("ConfigMap", "model-orchestrator-scrape")["data"]["scrape-config.yml"])
    for job in scrape["scrape_configs"]:
        assert job.pop("kubernetes_sd_configs")[0]["role"] == "pod"
        job["static_configs"] = [{"targets": ["10.0.0.5:8000"]}]
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(yaml.safe_dump(scrape))
    r = subprocess.run([promtool, "check", "config", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_dashboard_configmap_is_the_generated_dashboard_and_every_query_selects_the_node():
    board = _dashboard_module()
    text = board.render()
    cm = _one("ConfigMap", "model-orchestrator-dashboard")
    assert (DEPLOY / "grafana-dashboard.yaml").read_text() == board.configmap(text), \
        "deploy/kubernetes/grafana-dashboard.yaml drifted: run `.venv/bin/python grafana/build_dashboard.py`"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["model-orchestrator.json"])
    assert dashboard == json.loads(text)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["node"]["allValue"] == ".*" and variables["node"]["multi"] is True
    targets = [(p["title"], t["expr"]) for p in dashboard["panels"] if p["type"] != "row" for t in p["targets"]]
    assert len(targets) > 30
    assert [title for title, expr in targets if '$node' not in expr] == []
    per_node = [title for title, expr in targets if "by (node" in expr]
    assert len(per_node) >= 4, per_node
