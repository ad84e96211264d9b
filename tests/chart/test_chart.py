"""The Helm chart, rendered and linted with the real Helm SDK (helm-python-sdk, Helm v4)."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml

from finetune_operator.settings import ENV_PREFIX, Settings

from .render import (CHART_DIR, KUBE_VERSION, MODES, NAMESPACE, REPO, by_kind, chart, one,
                     render)

CUSTOM_KINDS = {"ServiceMonitor", "ClusterKopfPeering", "KopfPeering"}


def container(objects):
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    return pod, c


def env_of(objects) -> dict[str, str]:
    _, c = container(objects)
    return {e["name"]: e.get("value") for e in c["env"]}


# -- Helm's own checks ------------------------------------------------------------------

@pytest.mark.parametrize("mode", sorted(MODES))
def test_helm_lint_strict_is_clean(mode):
    report = helm_python.lint(str(CHART_DIR), MODES[mode], strict=True,
                              namespace=NAMESPACE, kube_version="v" + KUBE_VERSION)
    assert report["errors"] == []
    # Severity 1 is informational ("icon is recommended"); warnings (2) and errors (3) fail.
    serious = [m for m in report["messages"] if m["severity"] >= 2]
    assert serious == [], serious


def test_lint_reports_a_broken_values_file():
    # The lint call above can fail: the same chart with schema-breaking values does.
    report = helm_python.lint(str(CHART_DIR), {"replicaCount": 0}, strict=True,
                              kube_version="v" + KUBE_VERSION)
    assert any(m["severity"] >= 2 for m in report["messages"]) or report["errors"]


# -- every manifest is a valid Kubernetes object ------------------------------------------

@pytest.mark.parametrize("mode", sorted(MODES))
def test_manifests_validate_against_kubernetes_schemas(mode):
    objects = render(MODES[mode])
    assert objects
    for obj in objects:
        if obj["kind"] in CUSTOM_KINDS:
            continue
        # strict=True rejects unknown fields, as `kubectl apply --validate=strict` does.
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def test_kubernetes_validate_catches_unknown_fields():
    deployment = one(render(), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)


def test_servicemonitor_shape():
    objects = render(MODES["servicemonitor"])
    monitor = one(objects, "ServiceMonitor")
    service = one(objects, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == NAMESPACE
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    spec = monitor["spec"]
    assert set(spec) == {"selector", "namespaceSelector", "endpoints"}
    # It selects the metrics Service by its labels and scrapes the Service's named port.
    labels = service["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = spec["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert endpoint["interval"] == "30s" and endpoint["scrapeTimeout"] == "10s"


def test_servicemonitor_needs_metrics():
    objects = render({"metrics": {"enabled": False, "serviceMonitor": {"enabled": True}}})
    assert not by_kind(objects, "ServiceMonitor")


@pytest.mark.parametrize("mode", ["peering-2-replicas", "namespaced-peering"])
def test_peering_objects_match_the_chart_crds(mode):
    crds = {}
    for crd_file in chart().crds:
        for doc in yaml.safe_load_all(crd_file["data"]):
            crds[doc["spec"]["names"]["kind"]] = doc
    objects = render(MODES[mode])
    peerings = by_kind(objects, "ClusterKopfPeering") + by_kind(objects, "KopfPeering")
    assert peerings
    for obj in peerings:
        crd = crds[obj["kind"]]
        assert obj["apiVersion"] == f"{crd['spec']['group']}/{crd['spec']['versions'][0]['name']}"
        namespaced = crd["spec"]["scope"] == "Namespaced"
        assert ("namespace" in obj["metadata"]) == namespaced
        jsonschema.validate(obj, crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


# -- values.schema.json -------------------------------------------------------------------

@pytest.mark.parametrize("values, message", [
    ({"replicaCount": 0}, "/replicaCount': minimum: got 0, want 1"),
    ({"operator": {"logLevel": "verbose"}}, "/operator/logLevel': value must be one of 'info', 'debug'"),
    ({"rbac": {"mode": "clusterwide"}}, "/rbac/mode': value must be one of 'cluster', 'namespaced'"),
    ({"replicaCount": 2}, "/peering/enabled': value must be true"),
    ({"rbac": {"mode": "namespaced"}}, "/watchNamespaces': minItems: got 0, want 1"),
    ({"watchNamespaces": ["team-a"]}, "/watchNamespaces': maxItems: got 1, want 0"),
    ({"watchNamespaces": ["Team_A"], "rbac": {"mode": "namespaced"}}, "/watchNamespaces/0'"),
    ({"metrics": {"port": 70000}}, "/metrics/port': maximum: got 70,000, want 65,535"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy'"),
    ({"replicas": 2}, "additional properties 'replicas' not allowed"),
])
def test_schema_rejects_bad_values_with_a_clear_message(values, message):
    with pytest.raises(helm_python.HelmValuesError) as err:
        chart().validate_schema(values)
    assert message in str(err.value)
    # Rendering (what `helm install` does) refuses them too.
    with pytest.raises(helm_python.HelmError):
        chart().render(values, name="ft", namespace=NAMESPACE)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_schema_accepts_every_mode(mode):
    chart().validate_schema(MODES[mode])


def test_values_yaml_and_schema_agree():
    # Every top-level key of values.yaml is declared: additionalProperties would reject it.
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    schema = chart().schema
    assert set(values) <= set(schema["properties"])


# -- the CRD is the project's --------------------------------------------------------------

def test_chart_crd_is_byte_identical_to_the_generated_one():
    top = REPO / "crds" / "finetune.dev_finetunejobs.yaml"
    copy = CHART_DIR / "crds" / "finetune.dev_finetunejobs.yaml"
    assert copy.read_bytes() == top.read_bytes(), \
        "run: .venv/bin/finetune crd --write crds charts/finetune-operator/crds"
    names = {c["name"] for c in chart().crds}
    assert "crds/finetune.dev_finetunejobs.yaml" in names


def test_chart_crds_are_not_templated():
    # Helm installs crds/ before the templates but never upgrades or deletes them.
    for mode in MODES.values():
        assert not by_kind(render(mode), "CustomResourceDefinition")


# -- the Deployment ------------------------------------------------------------------------

@pytest.mark.parametrize("mode", sorted(MODES))
def test_security_context_is_locked_down(mode):
    pod, c = container(render(MODES[mode]))
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "privileged" not in sc or sc["privileged"] is False
    # A read-only root needs a writable /tmp, and it must be an emptyDir.
    (tmp,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == tmp["name"]]
    assert "emptyDir" in volume


def test_one_replica_uses_recreate_and_runs_standalone():
    objects = render()
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert "FINETUNE_OPERATOR_PEERING" not in env_of(objects)
    assert not by_kind(objects, "ClusterKopfPeering")
    # Standalone runs the image's ENTRYPOINT as is.
    assert "command" not in container(objects)[1]


def test_peering_with_two_replicas():
    objects = render(MODES["peering-2-replicas"])
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    env = env_of(objects)
    peering = one(objects, "ClusterKopfPeering")
    assert env["FINETUNE_OPERATOR_PEERING"] == peering["metadata"]["name"] == "ft-finetune-operator"
    _, c = container(objects)
    # kopf's peer identity is the pod name.
    (pod_id,) = [e for e in c["env"] if e["name"] == "POD_ID"]
    assert pod_id["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # Each replica draws its own priority: kopf pauses all peers that share one.
    assert c["command"] == ["/bin/sh", "-c"]
    assert "FINETUNE_OPERATOR_PRIORITY=" in c["args"][0]
    assert c["args"][0].rstrip().endswith("exec finetune operator")


@pytest.mark.parametrize("mode", ["peering-2-replicas", "namespaced-peering"])
def test_every_peering_pod_draws_its_own_priority(mode):
    # Also with one replica: old and new pods overlap during a rolling update.
    _, c = container(render(MODES[mode]))
    assert c["command"] == ["/bin/sh", "-c"]
    assert "/dev/urandom" in c["args"][0]


def test_priority_command_yields_an_integer():
    # The same shell line the pods run, with the operator replaced by `printenv`.
    pod_args = container(render(MODES["peering-2-replicas"]))[1]["args"][0]
    line = pod_args.replace("exec finetune operator", "exec printenv FINETUNE_OPERATOR_PRIORITY")
    out = subprocess.run(["/bin/sh", "-c", line], capture_output=True, text=True, check=True)
    assert 0 <= int(out.stdout.strip()) <= 65535


def test_probes_use_the_operators_liveness_endpoint():
    objects = render({"livenessPort": 8181})
    _, c = container(objects)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["healthz"] == 8181
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert env_of(objects)["FINETUNE_OPERATOR_LIVENESS_PORT"] == "8181"


def test_metrics_on_and_off():
    on = render()
    service = one(on, "Service")
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9090,
                                         "targetPort": "metrics", "protocol": "TCP"}]
    assert env_of(on)["FINETUNE_OPERATOR_METRICS_PORT"] == "9090"
    # The Service selects the operator pods.
    pod_labels = one(on, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()

    off = render(MODES["metrics-off"])
    assert not by_kind(off, "Service")
    # 0 is the operator's "off" (Settings.metrics_port).
    assert env_of(off)["FINETUNE_OPERATOR_METRICS_PORT"] == "0"
    assert "metrics" not in {p["name"] for p in container(off)[1]["ports"]}


def test_operator_settings_are_passed_as_env():
    objects = render({
        "operator": {"defaultTrainerImage": "registry.example/trainer:1.2", "logLevel": "debug",
                     "logFormat": "plain"},
        "rbac": {"mode": "namespaced"}, "watchNamespaces": ["team-a", "team-b"],
    })
    env = env_of(objects)
    assert env["FINETUNE_OPERATOR_DEFAULT_IMAGE"] == "registry.example/trainer:1.2"
    assert env["FINETUNE_OPERATOR_VERBOSE"] == "true"
    assert env["FINETUNE_OPERATOR_LOG_FORMAT"] == "plain"
    assert env["FINETUNE_OPERATOR_NAMESPACES"] == "team-a,team-b"
    # Cluster mode watches everything: no namespace list at all.
    assert "FINETUNE_OPERATOR_NAMESPACES" not in env_of(render())


def test_default_gpu_node_pool_reaches_the_operator():
    tolerations = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    env = env_of(render({"operator": {"defaultNodeSelector": {"pool": "h100"},
                                      "defaultTolerations": tolerations}}))
    settings = Settings.from_env({k: v for k, v in env.items() if k.startswith(ENV_PREFIX)})
    assert settings.node_selector_default == {"pool": "h100"}
    assert settings.tolerations_default == tolerations
    plain = Settings.from_env({k: v for k, v in env_of(render()).items()
                               if k.startswith(ENV_PREFIX)})
    assert plain.node_selector_default == {} and plain.tolerations_default == []


@pytest.mark.parametrize("mode", sorted(MODES))
def test_env_is_what_the_operator_reads(mode):
    """Every FINETUNE_OPERATOR_* variable is a Settings field and parses to its value."""
    env = {k: v for k, v in env_of(render(MODES[mode])).items()
           if k.startswith(ENV_PREFIX) and k != ENV_PREFIX + "PRIORITY"}
    fields = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Settings)}
    assert set(env) <= fields, set(env) - fields
    settings = Settings.from_env(env)
    mode_values = MODES[mode]
    if mode_values.get("rbac", {}).get("mode") == "namespaced":
        assert settings.namespaces == tuple(mode_values["watchNamespaces"])
    else:
        assert settings.clusterwide
    assert (settings.peering is not None) == bool(mode_values.get("peering", {}).get("enabled"))
    assert settings.metrics_port == (0 if mode == "metrics-off" else 9090)
    assert settings.liveness_port == 8080


def test_image_tag_defaults_to_app_version_and_digest_wins():
    _, c = container(render())
    assert c["image"] == f"ghcr.io/finetune-operator/operator:{chart().metadata['appVersion']}"
    _, c = container(render(MODES["everything"]))
    assert c["image"] == "ghcr.io/finetune-operator/operator@sha256:" + "a" * 64
    pod, _ = container(render(MODES["everything"]))
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]


# -- RBAC ------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", sorted(MODES))
def test_no_rbac_wildcards(mode):
    for role in by_kind(render(MODES[mode]), "ClusterRole") + by_kind(render(MODES[mode]), "Role"):
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], (role["metadata"]["name"], rule)
            assert "nonResourceURLs" not in rule


def test_cluster_mode_has_a_cluster_role_only():
    objects = render(MODES["cluster-wide"])
    role = one(objects, "ClusterRole")
    binding = one(objects, "ClusterRoleBinding")
    assert not by_kind(objects, "Role") and not by_kind(objects, "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                  "kind": "ClusterRole", "name": role["metadata"]["name"]}
    sa = one(objects, "ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": NAMESPACE}]
    resources = {r for rule in role["rules"] for r in rule["resources"]}
    assert "customresourcedefinitions" in resources
    # kopf lists namespaces only when it is not cluster-wide.
    assert "namespaces" not in resources


def test_namespaced_mode_has_a_role_per_namespace_and_nothing_cluster_wide():
    objects = render(MODES["namespaced"])
    assert not by_kind(objects, "ClusterRole") and not by_kind(objects, "ClusterRoleBinding")
    roles = by_kind(objects, "Role")
    bindings = by_kind(objects, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for binding in bindings:
        assert binding["subjects"][0]["namespace"] == NAMESPACE


def test_peering_rules_follow_the_mode():
    def resources(objects):
        return {r for role in by_kind(objects, "ClusterRole") + by_kind(objects, "Role")
                for rule in role["rules"] for r in rule["resources"]}
    assert not {"clusterkopfpeerings", "kopfpeerings"} & resources(render())
    assert "clusterkopfpeerings" in resources(render(MODES["peering-2-replicas"]))
    namespaced = resources(render(MODES["namespaced-peering"]))
    assert "kopfpeerings" in namespaced and "clusterkopfpeerings" not in namespaced


def test_rbac_can_be_left_to_someone_else():
    objects = render({"rbac": {"create": False},
                      "serviceAccount": {"create": False, "name": "ops-provided"}})
    assert not {o["kind"] for o in objects} & {"ClusterRole", "Role", "ClusterRoleBinding",
                                               "RoleBinding", "ServiceAccount"}
    assert container(objects)[0]["serviceAccountName"] == "ops-provided"


# -- NetworkPolicy ---------------------------------------------------------------------------

def test_network_policy_is_off_by_default():
    assert not by_kind(render(), "NetworkPolicy")


def test_network_policy_allows_only_what_the_operator_needs():
    objects = render(MODES["everything"])
    policy = one(objects, "NetworkPolicy")
    spec = policy["spec"]
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert spec["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    (ingress,) = spec["ingress"]
    assert ingress["ports"] == [{"port": 9090, "protocol": "TCP"}]
    assert ingress["from"] == MODES["everything"]["networkPolicy"]["metricsFrom"]
    egress_ports = [sorted(p["port"] for p in rule["ports"]) for rule in spec["egress"]]
    assert egress_ports == [[443, 6443], [53, 53], [8265]]
    # The dashboard rule targets the RayCluster pods by the label the operator puts on them.
    from finetune_operator.settings import MANAGED_BY, MANAGED_BY_LABEL
    dashboard = spec["egress"][2]["to"][0]["podSelector"]["matchLabels"]
    assert dashboard == {MANAGED_BY_LABEL: MANAGED_BY}


def test_operator_package_is_importable_without_kopf_for_these_tests():
    # test_env_is_what_the_operator_reads imports finetune_operator.settings; it must stay
    # light, or the chart tests would need the operator's runtime.
    code = "import finetune_operator.settings, sys; assert 'kopf' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_values_documented_in_install_md_exist():
    """Every value the install guide's table names is a real key of values.yaml."""
    import re
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    table = (REPO / "docs" / "install.md").read_text().split("### Values", 1)[1]
    table = table.split("\n\n", 2)[1]
    names = [n for row in table.splitlines() if row.startswith("| `")
             for n in re.findall(r"`([a-zA-Z.]+)`", row.split("|")[1])]
    assert len(names) > 20
    for name in names:
        node = values
        for part in name.split("."):
            assert isinstance(node, dict) and part in node, f"docs/install.md names {name}"
            node = node[part]
