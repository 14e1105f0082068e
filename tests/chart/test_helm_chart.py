"""The blazen-operator Helm chart, checked with a real helm binary (hack/build-helm.sh, cached by version)."""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from blazen_operator import cli, kinds

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "blazen-operator"
CRDS = ROOT / "crds"
RELEASE = "bo"
RELEASE_NS = "blazen-system"

# A cold build of helm takes minutes on two cores; the session fixture runs inside the first test's timeout.
pytestmark = pytest.mark.timeout(1800)


def _lib(var: str) -> str:
    out = subprocess.run(
        ["bash", "-c", f'source hack/lib.sh && printf %s "${var}"'],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout


@pytest.fixture(scope="session")
def helm() -> Path:
    """Path of the helm binary; builds it on a cold cache, a no-op otherwise."""
    subprocess.run([str(ROOT / "hack" / "build-helm.sh")], cwd=ROOT, check=True, capture_output=True)
    path = Path(_lib("CACHE_ROOT")) / f"helm-{_lib('HELM_VERSION')}" / "bin" / "helm"
    assert path.is_file(), path
    return path


def run_helm(helm: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(helm), *args], cwd=ROOT, capture_output=True, text=True)
    if check and proc.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def template(helm: Path, *args: str) -> list[dict[str, Any]]:
    proc = run_helm(helm, "template", RELEASE, str(CHART), "--namespace", RELEASE_NS, *args)
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in by_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[d['metadata'] for d in found]}"
    return found[0]


def crd_files() -> list[Path]:
    return sorted(p for p in CRDS.iterdir() if p.suffix in {".yaml", ".yml", ".json"})


def table_rules(*, cluster_scoped: bool) -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource) -> verbs, from the operator's one table of managed kinds."""
    return {(g, r): set(verbs) for g, r, verbs in kinds.rbac_rules(cluster_scoped=cluster_scoped)}


# The namespaced permissions the operator is granted: exactly the verbs its code uses (operator/kinds.py;
# the API tests run the operator under these rules). Children are server-side applied: patch, never update;
# Secrets are never listed or watched.
EXPECTED_RULES = table_rules(cluster_scoped=False)
# Cluster-scoped reads kopf needs whatever the scope.
CLUSTER_READ = table_rules(cluster_scoped=True)


def test_expected_rules_are_least_privilege() -> None:
    # The table itself, spelled out where it matters for an attacker holding the operator's token.
    assert EXPECTED_RULES[("", "secrets")] == {"get", "create", "patch", "delete"}, "no list/watch of Secrets"
    assert EXPECTED_RULES[("", "pods")] == {"list", "patch"}  # the pod-deletion-cost annotation
    assert EXPECTED_RULES[("blazen.dev", "blazenpeers/status")] == {"patch"}
    assert not any("update" in verbs for (_, r), verbs in EXPECTED_RULES.items() if "/" not in r)
    assert ("events.k8s.io", "events") not in EXPECTED_RULES
    cluster_reads = {
        ("apiextensions.k8s.io", "customresourcedefinitions"): {"get", "list", "watch"},
        ("", "namespaces"): {"get", "list", "watch"},
    }
    assert cluster_reads == CLUSTER_READ


def test_committed_rules_template_equals_generated() -> None:
    assert (CHART / "templates" / "_rules.tpl").read_text() == kinds.render_helm_rules(), (
        "helm/blazen-operator/templates/_rules.tpl is stale: run "
        "`python -m blazen_operator.kinds > helm/blazen-operator/templates/_rules.tpl`"
    )


def flatten(rules: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        assert set(rule) <= {"apiGroups", "resources", "verbs"}, rule  # no resourceNames, no nonResourceURLs
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def assert_least_privilege(rules: list[dict[str, Any]]) -> None:
    for rule in rules:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], rule
        assert not {"escalate", "bind", "impersonate", "deletecollection"} & set(rule["verbs"]), rule


def subjects_are_operator_sa(binding: dict[str, Any]) -> None:
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "bo-blazen-operator", "namespace": RELEASE_NS}
    ]


# --------------------------------------------------------------------------------------------------- helm


def test_helm_binary_reports_its_version_and_assumes_the_project_kubernetes(
    helm: Path, tmp_path: Path
) -> None:
    version = run_helm(helm, "version", "--template", "{{ .Version }}").stdout.strip()
    assert version == _lib("HELM_VERSION")
    # A throwaway chart prints the Kubernetes version `helm template` assumes without a cluster.
    chart = tmp_path / "caps"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: caps\nversion: 0.0.1\n")
    (chart / "templates" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: caps\n"
        "data:\n  kube: {{ .Capabilities.KubeVersion.Version | quote }}\n"
    )
    doc = yaml.safe_load(run_helm(helm, "template", "x", str(chart)).stdout)
    k8s = _lib("K8S_VERSION")  # v1.34.4 -> v1.34.0
    assert doc["data"]["kube"] == ".".join(k8s.split(".")[:2]) + ".0"


def test_build_is_a_noop_when_cached(helm: Path) -> None:
    before = helm.stat().st_mtime_ns
    proc = subprocess.run(
        [str(ROOT / "hack" / "build-helm.sh")], cwd=ROOT, check=True, capture_output=True, text=True
    )
    assert proc.stdout.strip() == str(helm)
    assert "cached" in proc.stderr
    assert helm.stat().st_mtime_ns == before


# --------------------------------------------------------------------------------------------------- chart


def test_crds_directory_is_a_symlink_to_the_repository_crds() -> None:
    link = CHART / "crds"
    assert link.is_symlink()
    assert link.readlink() == Path("../../crds")
    assert link.resolve() == CRDS.resolve()


def test_lint_is_clean(helm: Path) -> None:
    for extra in ([], ["--set", "watchNamespaces={a,b}"]):
        proc = run_helm(helm, "lint", "--strict", str(CHART), *extra)
        out = proc.stdout + proc.stderr
        assert "1 chart(s) linted, 0 chart(s) failed" in out
        assert "[WARNING]" not in out
        assert "[ERROR]" not in out


def test_default_values_watch_all_namespaces_with_a_cluster_role(helm: Path) -> None:
    docs = template(helm)
    doc_kinds = sorted(d["kind"] for d in docs)
    assert doc_kinds == [
        "ClusterRole",
        "ClusterRole",
        "ClusterRoleBinding",
        "ClusterRoleBinding",
        "Deployment",
        "Service",
        "ServiceAccount",
    ]
    assert not by_kind(docs, "Role")
    assert not by_kind(docs, "RoleBinding")

    operator_role = one(docs, "ClusterRole", "bo-blazen-operator")
    assert_least_privilege(operator_role["rules"])
    assert flatten(operator_role["rules"]) == EXPECTED_RULES
    crd_role = one(docs, "ClusterRole", "bo-blazen-operator-cluster")
    assert_least_privilege(crd_role["rules"])
    assert flatten(crd_role["rules"]) == CLUSTER_READ

    for name in ("bo-blazen-operator", "bo-blazen-operator-cluster"):
        binding = one(docs, "ClusterRoleBinding", name)
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": name,
        }
        subjects_are_operator_sa(binding)

    sa = one(docs, "ServiceAccount")
    assert sa["metadata"] == {
        "name": "bo-blazen-operator",
        "namespace": RELEASE_NS,
        "labels": sa["metadata"]["labels"],
    }
    args = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args == [
        "run",
        "--all-namespaces",
        "--operator-namespace=blazen-system",
        "--operator-pod-labels=app.kubernetes.io/name=blazen-operator,app.kubernetes.io/instance=bo",
        "--liveness-port=8081",
        "--metrics-port=8000",
        "--resync-seconds=60",
        "--ca-rotation-settle-seconds=120",
    ]


def test_watch_namespaces_gives_a_role_in_each_and_only_crd_reads_cluster_wide(helm: Path) -> None:
    docs = template(helm, "--set", "watchNamespaces={team-a,team-b}")

    cluster_roles = by_kind(docs, "ClusterRole")
    assert [r["metadata"]["name"] for r in cluster_roles] == ["bo-blazen-operator-cluster"]
    assert flatten(cluster_roles[0]["rules"]) == CLUSTER_READ
    assert [b["roleRef"]["name"] for b in by_kind(docs, "ClusterRoleBinding")] == [
        "bo-blazen-operator-cluster"
    ]

    roles = by_kind(docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for role in roles:
        assert role["metadata"]["name"] == "bo-blazen-operator"
        assert_least_privilege(role["rules"])
        assert flatten(role["rules"]) == EXPECTED_RULES

    bindings = by_kind(docs, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for binding in bindings:
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": "bo-blazen-operator",
        }
        subjects_are_operator_sa(binding)

    args = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:3] == ["run", "--namespace=team-a", "--namespace=team-b"]
    assert "--all-namespaces" not in args


def test_rbac_can_be_left_to_the_cluster_admin(helm: Path) -> None:
    docs = template(helm, "--set", "rbac.create=false", "--set", "serviceAccount.create=false")
    doc_kinds = {d["kind"] for d in docs}
    assert doc_kinds == {"Deployment", "Service"}
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "default"


def test_deployment_is_a_single_hardened_replica(helm: Path) -> None:
    docs = template(helm, "--set", "image.tag=dev", "--set", "image.pullPolicy=Never")
    deploy = one(docs, "Deployment")
    assert deploy["metadata"]["namespace"] == RELEASE_NS
    spec = deploy["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert pod["serviceAccountName"] == "bo-blazen-operator"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}

    (container,) = pod["containers"]
    assert container["image"] == "blazen-fleet/operator:dev"
    assert container["imagePullPolicy"] == "Never"
    assert container["command"] == ["blazen-operator"]
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["resources"]["requests"] == {"cpu": "50m", "memory": "128Mi"}
    assert container["resources"]["limits"] == {"memory": "256Mi"}

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 8000, "healthz": 8081}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    # A read-only root filesystem still needs a writable /tmp.
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]

    labels = deploy["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "blazen-operator"
    assert labels["app.kubernetes.io/instance"] == RELEASE
    assert labels["app.kubernetes.io/managed-by"] == "Helm"
    assert labels["app.kubernetes.io/version"] == "dev"
    assert labels["helm.sh/chart"] == "blazen-operator-0.1.0"


def test_ports_and_flags_follow_the_values(helm: Path) -> None:
    docs = template(
        helm,
        *("--set", "metrics.port=9100", "--set", "metrics.service.port=80"),
        *(
            "--set",
            "livenessProbe.port=9101",
            "--set",
            "operator.resyncSeconds=15",
            "--set",
            "operator.caRotationSettleSeconds=45",
            "--set",
            "operator.verbose=true",
        ),
    )
    svc = one(docs, "Service")
    assert svc["metadata"]["name"] == "bo-blazen-operator-metrics"
    assert svc["spec"]["ports"] == [
        {"name": "metrics", "port": 80, "targetPort": "metrics", "protocol": "TCP"}
    ]
    assert svc["spec"]["selector"] == one(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "metrics", "containerPort": 9100, "protocol": "TCP"} in container["ports"]
    assert {"name": "healthz", "containerPort": 9101, "protocol": "TCP"} in container["ports"]
    # The ports the pod declares are the ports the operator is told to listen on.
    assert container["args"][4:] == [
        "--liveness-port=9101",
        "--metrics-port=9100",
        "--resync-seconds=15",
        "--ca-rotation-settle-seconds=45",
        "--verbose",
    ]
    # what the chart renders is what the operator's own parser takes
    (settle,) = [a for a in container["args"] if a.startswith("--ca-rotation-settle-seconds=")]
    assert cli.build_parser().parse_args(["run", settle]).ca_rotation_settle_seconds == 45

    # The selector labels the operator passes for its own pods select exactly its pods, in its namespace.
    (labels_arg,) = [a for a in container["args"] if a.startswith("--operator-pod-labels=")]
    pairs = dict(p.split("=", 1) for p in labels_arg.split("=", 1)[1].split(","))
    assert pairs == one(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    assert f"--operator-namespace={RELEASE_NS}" in container["args"]

    docs = template(helm, "--set", "metrics.service.enabled=false")
    assert not by_kind(docs, "Service")


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--set", "watchNamespaces={Not_A_Namespace}"], "watchNamespaces"),
        (["--set", "image.pullPolicy=Sometimes"], "pullPolicy"),
        (["--set", "replicas=3"], "replicas"),
        (["--set", "metrics.port=70000"], "port"),
        (["--set", "rbac.create=maybe"], "create"),
        (["--set", "operator.caRotationSettleSeconds=-1"], "caRotationSettleSeconds"),
    ],
)
def test_schema_rejects_bad_values_naming_the_field(helm: Path, args: list[str], field: str) -> None:
    proc = run_helm(helm, "template", RELEASE, str(CHART), *args, check=False)
    assert proc.returncode != 0
    assert "values don't meet the specifications of the schema" in proc.stderr
    assert field in proc.stderr


def test_crds_rendered_and_packaged_are_the_repository_crds(helm: Path, tmp_path: Path) -> None:
    files = crd_files()
    assert files, "crds/ holds no CRD"
    expected = [d for f in files for d in yaml.safe_load_all(f.read_text()) if d]
    assert {d["kind"] for d in expected} == {"CustomResourceDefinition"}
    assert "blazenpeers.blazen.dev" in {d["metadata"]["name"] for d in expected}

    rendered = by_kind(template(helm, "--include-crds"), "CustomResourceDefinition")
    assert rendered == expected
    shown = [d for d in yaml.safe_load_all(run_helm(helm, "show", "crds", str(CHART)).stdout) if d]
    assert shown == expected

    run_helm(helm, "package", str(CHART), "--destination", str(tmp_path))
    (tgz,) = tmp_path.glob("blazen-operator-*.tgz")
    with tarfile.open(tgz) as tar:
        packaged = {
            Path(m.name).name: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.name.startswith("blazen-operator/crds/") and m.isfile()
        }
    assert packaged == {f.name: f.read_bytes() for f in files}


def render_notes(helm: Path, tmp_path: Path, *args: str) -> str:
    """NOTES.txt rendered offline.

    `helm install --dry-run` needs a cluster, so a copy of the chart renders the notes through `tpl` into a
    ConfigMap that `helm template` prints.
    """
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart, symlinks=False)
    (chart / "notes-src.txt").write_text((CHART / "templates" / "NOTES.txt").read_text())
    (chart / "templates" / "notes-under-test.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\n"
        'data:\n  notes: {{ tpl (.Files.Get "notes-src.txt") . | quote }}\n'
    )
    proc = run_helm(helm, "template", RELEASE, str(chart), "--namespace", RELEASE_NS, *args)
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d and d["kind"] == "ConfigMap"]
    return docs[0]["data"]["notes"]


def test_notes_name_the_deployment_and_scope(helm: Path, tmp_path: Path) -> None:
    notes = render_notes(helm, tmp_path / "scoped", "--set", "watchNamespaces={team-a,team-b}")
    assert f"kubectl -n {RELEASE_NS} rollout status deployment/bo-blazen-operator" in notes
    assert "It reconciles BlazenPeers in: team-a, team-b." in notes
    assert f"http://bo-blazen-operator-metrics.{RELEASE_NS}.svc:8000/metrics" in notes

    notes = render_notes(helm, tmp_path / "all", "--set", "metrics.service.enabled=false")
    assert "It reconciles BlazenPeers in every namespace." in notes
    assert "Metrics:" not in notes


def leaf_paths(values: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of the documented values: leaves, and maps that are whole Kubernetes objects."""
    whole = {"resources", "podSecurityContext", "securityContext", "nodeSelector", "affinity"}
    out = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and path not in whole:
            out.extend(leaf_paths(value, f"{path}."))
        else:
            out.append(path)
    return out


def test_every_value_is_documented_and_in_the_schema() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    docs = (ROOT / "docs" / "helm.md").read_text()
    schema = json.loads((CHART / "values.schema.json").read_text())
    for path in leaf_paths(values):
        assert f"| `{path}` |" in docs, f"docs/helm.md has no row for {path}"
        node = schema
        for part in path.split("."):
            node = node["properties"][part]


def operator_doc_rules() -> tuple[dict[tuple[str, str], set[str]], dict[tuple[str, str], set[str]]]:
    """The two RBAC tables of docs/operator.md: (cluster-scoped, per watched namespace)."""
    text = (ROOT / "docs" / "operator.md").read_text()
    section = text.split("## RBAC the operator needs", 1)[1].split("\n## ", 1)[0]
    cluster_part, namespaced_part = section.split("In every watched namespace", 1)

    def table(part: str) -> dict[tuple[str, str], set[str]]:
        out: dict[tuple[str, str], set[str]] = {}
        for line in part.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) < 3 or not cells[0].startswith("`"):
                continue
            group = cells[0].strip("`").replace('""', "")
            verbs = {v.strip(" `") for v in cells[2].split(",")}
            for resource in cells[1].split(","):
                out.setdefault((group, resource.strip(" `")), set()).update(verbs)
        return out

    return table(cluster_part), table(namespaced_part)


def test_rbac_is_exactly_what_docs_operator_md_asks_for(helm: Path) -> None:
    cluster, namespaced = operator_doc_rules()
    assert (len(cluster), len(namespaced)) == (2, 21)
    docs = template(helm)
    assert flatten(one(docs, "ClusterRole", "bo-blazen-operator-cluster")["rules"]) == cluster
    assert flatten(one(docs, "ClusterRole", "bo-blazen-operator")["rules"]) == namespaced
    docs = template(helm, "--set", "watchNamespaces={team-a}")
    assert flatten(one(docs, "Role")["rules"]) == namespaced
