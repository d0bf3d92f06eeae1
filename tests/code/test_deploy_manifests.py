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
    assert {d["kind"] for _, d in docs} >= {"Namespace", "ConfigMap", "Secret", "Deployment", "Service"}
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
    config = next(d for _, d in _documents() if d["kind"] == "ConfigMap")
    assert config["data"]["LESIONFLOW_INFERENCE_LOG"].startswith("s3://"), "replicas share one log"
