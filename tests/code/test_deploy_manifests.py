"""The Kubernetes manifests under deploy/k8s validate against the Kubernetes schemas (offline:
kubernetes-validate ships them), strictly (no unknown field), and agree with the code: the
probes are endpoints the service has, the port is the Bento's, every LESIONFLOW_* variable is
one the code reads, and kustomization.yaml lists every manifest."""

from __future__ import annotations

import re

import kubernetes_validate
import pytest
import yaml

from tests.conftest import PROJECT_ROOT

K8S = PROJECT_ROOT / "deploy" / "k8s"
VERSIONS = ("1.30", "1.33", kubernetes_validate.latest_version().rsplit(".", 1)[0])


def _documents() -> list[tuple[str, dict]]:
    docs = []
    for f in sorted(K8S.glob("*.yaml")):
        if f.name == "kustomization.yaml":
            continue
        docs += [(f.name, d) for d in yaml.safe_load_all(f.read_text()) if d]
    return docs


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_validates_strictly_against_the_kubernetes_schemas(version):
    docs = _documents()
    kinds = {d["kind"] for _, d in docs}
    assert kinds >= {
        "Namespace",
        "ConfigMap",
        "Deployment",
        "Service",
        "NetworkPolicy",
        "Ingress",
        "PodDisruptionBudget",
    }
    for name, doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_kustomization_lists_every_manifest():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == sorted(f.name for f in K8S.glob("*.yaml") if f.name != "kustomization.yaml")


def test_the_service_deployment_matches_the_bento():
    deployment = next(d for _, d in _documents() if d["kind"] == "Deployment" and d["metadata"]["name"] == "lesionflow")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["ports"][0]["containerPort"] == 3000  # bentoml serve's default port (EXPOSE 3000)
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert deployment["spec"]["replicas"] >= 2
    service = next(d for _, d in _documents() if d["kind"] == "Service")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_every_lesionflow_variable_in_the_manifests_is_read_by_the_code():
    code = "\n".join(p.read_text() for p in (PROJECT_ROOT / "pipeline").rglob("*.py"))
    text = "\n".join(f.read_text() for f in K8S.glob("*.yaml"))
    names = set(re.findall(r"\b(LESIONFLOW_[A-Z_]+)\b", text))
    assert names, "the manifests configure the service"
    for name in names:
        assert f'"{name}"' in code, f"{name} is set in deploy/k8s but no code reads it"
    config = next(
        d for _, d in _documents() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "lesionflow-service"
    )
    assert config["data"]["LESIONFLOW_INFERENCE_LOG"].startswith("s3://"), "replicas share one log"


def _pod(name: str) -> dict:
    return next(d for _, d in _documents() if d["kind"] == "Deployment" and d["metadata"]["name"] == name)["spec"][
        "template"
    ]["spec"]


def test_no_secret_is_committed_and_the_ones_referenced_are_generated_from_local_files():
    """Secrets (API tokens, object-store credentials) come from files kustomize reads at apply time
    (deploy/k8s/secrets/, git-ignored): no Secret manifest with placeholder values."""
    assert not [name for name, d in _documents() if d["kind"] == "Secret"]
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    generated = {g["name"] for g in kust["secretGenerator"]}
    referenced = set()
    for pod in (_pod("lesionflow"), _pod("lesionflow-prefect-worker")):
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            referenced |= {e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e}
        referenced |= {v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
    assert referenced == generated == {"lesionflow-api-tokens", "lesionflow-object-store"}
    assert "/deploy/k8s/secrets/" in (PROJECT_ROOT / ".gitignore").read_text().splitlines()


def test_the_service_pod_is_locked_down_and_reads_its_tokens_from_the_secret():
    pod = _pod("lesionflow")
    container = pod["containers"][0]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    config = next(d for _, d in _documents() if d["metadata"]["name"] == "lesionflow-service")["data"]
    assert config["LESIONFLOW_API_TOKENS_FILE"].startswith(mounts["api-tokens"] + "/")
    assert mounts["tmp"] == "/tmp" and {"emptyDir"} <= set(next(v for v in pod["volumes"] if v["name"] == "tmp"))
    policy = next(d for _, d in _documents() if d["kind"] == "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= container_labels().items()
    assert [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]] == [3000, 3000]
    ingress = next(d for _, d in _documents() if d["kind"] == "Ingress")
    assert ingress["spec"]["tls"] and ingress["spec"]["tls"][0]["secretName"]


def container_labels() -> dict:
    return next(d for _, d in _documents() if d["kind"] == "Deployment" and d["metadata"]["name"] == "lesionflow")[
        "spec"
    ]["template"]["metadata"]["labels"]


def test_the_prefect_worker_gets_the_project_before_it_starts():
    pod = _pod("lesionflow-prefect-worker")
    init = pod["initContainers"][0]
    script = init["args"][0]
    assert "git clone" in script and "$PROJECT_GIT_REF" in script and "dvc pull data.dvc" in script
    worker = pod["containers"][0]
    assert worker["workingDir"] == "/workspace/lesionflow"
    assert {m["mountPath"] for m in init["volumeMounts"]} == {m["mountPath"] for m in worker["volumeMounts"]}
