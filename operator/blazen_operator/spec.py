"""The BlazenPeer spec and status as pydantic models.

These models are the single source of truth: ``crdgen`` turns them into the CRD's OpenAPI schema
(descriptions, defaults, CEL rules included), and the handlers parse every object through them.
Field names are camelCase on the
wire (aliases) and snake_case in Python.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

GROUP = "blazen.dev"
VERSION = "v1alpha1"
KIND = "BlazenPeer"
PLURAL = "blazenpeers"
SINGULAR = "blazenpeer"
SHORT_NAMES = ["bp"]
API_VERSION = f"{GROUP}/{VERSION}"

DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"
# Volume names the operator mounts itself; spec.volumes may not reuse them.
RESERVED_VOLUMES = ("tmp", "home", "dshm", "tls", "token", "trust")

# An extended-resource or Kubernetes quantity: 1, "500m", "2Gi".
Quantity = Annotated[
    int | str,
    Field(json_schema_extra={"x-kubernetes-int-or-string": True}),
]
IntOrString = Quantity
# A free-form Kubernetes object we pass through unchanged (affinity, valueFrom, label selectors).
FreeForm = Annotated[
    dict[str, Any],
    Field(json_schema_extra={"x-kubernetes-preserve-unknown-fields": True}),
]


class Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=False,
    )

    def dump(self) -> dict[str, Any]:
        """The camelCase wire form without unset optional fields."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class ResourceRequirements(Model):
    """Compute resources of the peer container, as in a Pod's ``resources``."""

    requests: dict[str, Quantity] | None = Field(
        None, description="Minimum resources, e.g. {cpu: 500m, memory: 1Gi}."
    )
    limits: dict[str, Quantity] | None = Field(
        None,
        description="Maximum resources. The GPU count from spec.hardware is added to both requests "
        "and limits.",
    )


class Hardware(Model):
    """Accelerators and node-pool placement."""

    gpu: int = Field(
        0,
        ge=0,
        le=64,
        description="GPUs per pod. Above 0 the pod requests and limits that many of gpuResourceName, "
        "tolerates the GPU taint, selects poolSelector when set, and gets default CPU/memory requests "
        "and a /dev/shm. See spec.rollout for GPU peers without a spare GPU.",
    )
    gpu_resource_name: str = Field(
        DEFAULT_GPU_RESOURCE,
        min_length=1,
        max_length=253,
        description="Extended resource name of the GPU device plugin.",
    )
    pool_selector: dict[str, str] | None = Field(
        None,
        description="Node labels that select the GPU pool, e.g. {nvidia.com/gpu.present: 'true'} (NVIDIA "
        "GPU feature discovery), {cloud.google.com/gke-accelerator: nvidia-l4} (GKE) or "
        "{k8s.amazonaws.com/accelerator: nvidia-tesla-t4} (EKS). Unset: no selector; the GPU request "
        "and the taint toleration alone place the pod. Merged under spec.nodeSelector.",
    )
    tolerate_gpu_taint: bool = Field(
        True,
        description="When gpu > 0, tolerate the '<gpuResourceName>' NoSchedule taint of GPU nodes. CPU-only "
        "peers never get this toleration, so they stay off the GPU pool.",
    )


class Toleration(Model):
    """A Pod toleration."""

    key: str | None = Field(None, description="Taint key; empty with operator Exists matches all taints.")
    operator: Literal["Exists", "Equal"] | None = Field(None, description="Exists or Equal (default Equal).")
    value: str | None = Field(None, description="Taint value for operator Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to match; empty matches all effects."
    )
    toleration_seconds: int | None = Field(None, description="For NoExecute: how long the pod stays bound.")


class IssuerRef(Model):
    """A cert-manager issuer."""

    name: str = Field(..., min_length=1, description="Issuer or ClusterIssuer name.")
    kind: Literal["Issuer", "ClusterIssuer"] = Field("Issuer", description="Issuer or ClusterIssuer.")
    group: str = Field("cert-manager.io", description="API group of the issuer.")


class BundleKeyRef(Model):
    """A key of a ConfigMap or Secret in the BlazenPeer's namespace."""

    name: str = Field(..., min_length=1, max_length=253, description="ConfigMap or Secret name.")
    key: str = Field("ca.crt", min_length=1, max_length=253, description="Key holding the PEM bundle.")


class TrustBundle(Model):
    """The CA bundle the peers trust, instead of the ca.crt the issuer writes into the certificate Secret."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.configMap) != has(self.secret)",
                    "message": "tls.trustBundle: set exactly one of configMap and secret",
                    "reason": "FieldValueInvalid",
                }
            ]
        }
    )

    config_map: BundleKeyRef | None = Field(
        None, description="ConfigMap key with the PEM bundle (e.g. one trust-manager writes)."
    )
    secret: BundleKeyRef | None = Field(None, description="Secret key with the PEM bundle.")

    @model_validator(mode="after")
    def _exactly_one(self) -> TrustBundle:
        # The CRD's CEL rule says the same; this covers objects that reach the operator some other way.
        if (self.config_map is None) == (self.secret is None):
            raise ValueError("tls.trustBundle: set exactly one of configMap and secret")
        return self


GO_DURATION = r"^([0-9]+(\.[0-9]+)?(h|m|s|ms))+$"
_GO_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def go_duration_seconds(value: str) -> float:
    """Seconds of a Go duration as the CRD accepts it (``2160h``, ``1h30m``)."""
    parts = re.findall(r"([0-9]+(?:\.[0-9]+)?)(ms|h|m|s)", value)
    if not parts or "".join(n + u for n, u in parts) != value:
        raise ValueError(f"{value!r} is not a duration such as 2160h or 1h30m")
    return sum(float(n) * _GO_UNITS[u] for n, u in parts)


class CA(Model):
    """The namespace CA the operator bootstraps when tls.issuerRef is unset.

    One CA serves every BlazenPeer of the namespace. When they disagree, the BlazenPeer with the shortest
    ca.duration sets both values (ties: the longest ca.renewBefore): the strictest policy wins."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "duration(self.duration) > duration(self.renewBefore)",
                    "message": "tls.ca.renewBefore must be shorter than tls.ca.duration",
                    "fieldPath": ".renewBefore",
                    "reason": "FieldValueInvalid",
                }
            ]
        }
    )

    duration: str = Field(
        "8760h",
        max_length=32,
        pattern=GO_DURATION,
        description="Lifetime of the namespace CA (Go duration). Must be longer than tls.duration.",
    )
    renew_before: str = Field(
        "720h",
        max_length=32,
        pattern=GO_DURATION,
        description="Rotate the namespace CA this long before it expires (Go duration): the operator "
        "issues a new CA, makes every pod trust both, re-issues every leaf, then drops the old CA "
        "(docs/security.md). Force a rotation now with the annotation blazen.dev/rotate-ca=<new value> on "
        "the ConfigMap blazen-trust.",
    )

    @model_validator(mode="after")
    def _renew_inside_lifetime(self) -> CA:
        if go_duration_seconds(self.duration) <= go_duration_seconds(self.renew_before):
            raise ValueError("tls.ca.renewBefore must be shorter than tls.ca.duration")
        return self


class TLS(Model):
    """Transport security of the gRPC and HTTP listeners (cert-manager Certificates)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "duration(self.duration) > duration(self.renewBefore)",
                    "message": "tls.renewBefore must be shorter than tls.duration",
                    "fieldPath": ".renewBefore",
                    "reason": "FieldValueInvalid",
                },
                {
                    "rule": "has(self.issuerRef) || duration(self.ca.duration) > duration(self.duration)",
                    "message": "tls.ca.duration must be longer than tls.duration (the leaf lifetime)",
                    "fieldPath": ".ca.duration",
                    "reason": "FieldValueInvalid",
                },
            ]
        }
    )

    enabled: bool = Field(
        True, description="Serve gRPC and HTTP over TLS. Turning it off requires auth.tokenSecretRef."
    )
    issuer_ref: IssuerRef | None = Field(
        None,
        description="Issuer of the peer certificates. Unset: the operator bootstraps a namespace CA "
        "(self-signed Issuer 'blazen-selfsigned' -> CA Certificate 'blazen-ca' -> CA Issuer 'blazen-ca') "
        "and the trust bundle ConfigMap 'blazen-trust' the pods trust, and rotates the CA (tls.ca). Set "
        "without trustBundle: the pods trust the ConfigMap 'blazen-trust-<kind>-<issuer>' the operator "
        "fills from the ca.crt of the issuer's leaves, old and new CA while the issuer's CA changes "
        "(docs/security.md, User issuers).",
    )
    trust_bundle: TrustBundle | None = Field(
        None,
        description="CA bundle that verifies callers' client certificates and siblings' certificates "
        "(--tls-ca). Unset: the issuer's ca.crt (through the operator's trust ConfigMap). Needed for "
        "mutual TLS with issuers that write no ca.crt (ACME and other public CAs); mounted as a directory, "
        "so updates reach the running pods. The operator never writes it: when the issuer's CA changes, "
        "keep old and new roots in it until every leaf is re-issued.",
    )
    duration: str = Field(
        "2160h",
        max_length=32,
        pattern=GO_DURATION,
        description="Requested certificate lifetime (Go duration, e.g. 2160h).",
    )
    renew_before: str = Field(
        "360h",
        max_length=32,
        pattern=GO_DURATION,
        description="Renew this long before expiry (Go duration). The runtime reloads renewed files "
        "in place.",
    )
    ca: CA = Field(
        default_factory=CA,
        description="Lifetime and renewal of the namespace CA (only when issuerRef is unset).",
    )

    @model_validator(mode="after")
    def _ca_outlives_leaves(self) -> TLS:
        if self.issuer_ref is None and go_duration_seconds(self.ca.duration) <= go_duration_seconds(
            self.duration
        ):
            raise ValueError("tls.ca.duration must be longer than tls.duration (the leaf lifetime)")
        return self


class SecretKeyRef(Model):
    """A key in a Secret of the BlazenPeer's namespace."""

    name: str = Field(..., min_length=1, description="Secret name.")
    key: str = Field("token", min_length=1, description="Key holding the bearer token.")


class Auth(Model):
    """Bearer-token authentication."""

    token_secret_ref: SecretKeyRef | None = Field(
        None,
        description="Secret key with the bearer token, mounted at /etc/blazen/token/token. A change to the "
        "Secret's data reaches the running pods through the mounted file (the runtime re-reads it and "
        "accepts the previous token for 120 s more); it does not roll the pods.",
    )


HttpAuthMode = Literal["ClientCertificate", "Token", "Unauthenticated"]
# spec.http.auth -> the runtime's --http-auth (unset: "auto", the runtime picks token, else client-cert).
HTTP_AUTH_FLAGS: dict[str | None, str] = {
    None: "auto",
    "ClientCertificate": "client-cert",
    "Token": "token",
    "Unauthenticated": "unauthenticated",
}


class Http(Model):
    """The HTTP/JSON shim."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "size(self.corsOrigins) == 0 || has(self.auth)",
                    "message": "spec.http.auth is required when http.corsOrigins is set: a browser-facing "
                    "shim needs an explicit decision (ClientCertificate at a proxy, Token, or "
                    "Unauthenticated)",
                    "fieldPath": ".auth",
                    "reason": "FieldValueRequired",
                }
            ]
        }
    )

    enabled: bool = Field(True, description="Serve the HTTP/JSON shim (HTTPS when TLS is on).")
    auth: HttpAuthMode | None = Field(
        None,
        description="Who may call the shim (--http-auth). ClientCertificate: a verified client certificate "
        "(needs tls.enabled; a browser reaches it through a proxy that presents one). Token: the bearer "
        "token of auth.tokenSecretRef on every call. Unauthenticated: anyone who reaches the port (the "
        "runtime logs a warning). Unset: Token when auth.tokenSecretRef is set, else ClientCertificate; "
        "required when corsOrigins is set.",
    )
    cors_origins: list[Annotated[str, Field(max_length=512)]] = Field(
        default_factory=list,
        max_length=32,
        description="Origins allowed by CORS (--cors-allow-origin). Needs http.auth.",
    )


class Ports(Model):
    """Container and Service ports."""

    grpc: int = Field(50051, ge=1, le=65535, description="gRPC port (TLS when tls.enabled).")
    http: int = Field(8080, ge=1, le=65535, description="HTTP/JSON shim port.")
    admin: int = Field(9090, ge=1, le=65535, description="Plain HTTP admin port: /healthz /readyz /metrics.")
    plaintext_grpc: int = Field(50052, ge=1, le=65535, description="Plaintext gRPC port (plaintextGrpc).")


class NetworkPeer(Model):
    """A NetworkPolicy peer: pods matching podSelector in namespaces matching namespaceSelector."""

    namespace_selector: FreeForm | None = Field(
        None, description="Label selector of namespaces; unset means the BlazenPeer's own namespace."
    )
    pod_selector: FreeForm | None = Field(None, description="Label selector of pods; unset means all pods.")


class PlaintextGrpc(Model):
    """Explicit plaintext gRPC for Blazen's own clients, which can do neither TLS nor tokens."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!self.enabled || size(self.allowedFrom) > 0",
                    "message": "plaintextGrpc.allowedFrom must name at least one peer when plaintext gRPC is "
                    "enabled: the NetworkPolicy fences the unauthenticated port",
                    "fieldPath": ".allowedFrom",
                    "reason": "FieldValueRequired",
                }
            ]
        }
    )

    enabled: bool = Field(
        False,
        description="Open an unauthenticated, unencrypted gRPC listener. A NetworkPolicy is then "
        "always created "
        "and admits this port only from allowedFrom.",
    )
    allowed_from: list[NetworkPeer] = Field(
        default_factory=list, max_length=32, description="Who may reach the plaintext port."
    )


MONITORING_LABEL = "blazen.dev/monitoring"


def _default_admin_allowed_from() -> list[NetworkPeer]:
    return [NetworkPeer(pod_selector={"matchLabels": {MONITORING_LABEL: "true"}})]


class NetworkPolicy(Model):
    """The ingress NetworkPolicy around the peer pods."""

    enabled: bool = Field(
        True,
        description="Create the NetworkPolicy (always created when plaintextGrpc is on). It fences the "
        "plain-HTTP admin port (/metrics, /v1/info) to the operator and adminAllowedFrom; the node (kubelet "
        "probes) is admitted by every common CNI.",
    )
    allowed_from: list[NetworkPeer] = Field(
        default_factory=list,
        max_length=32,
        description="Who may reach the gRPC and HTTP ports besides the peer's own pods; "
        "empty admits everyone.",
    )
    admin_allowed_from: list[NetworkPeer] = Field(
        default_factory=_default_admin_allowed_from,
        max_length=32,
        description="Who may reach the admin port besides the operator's pods: by default the pods of "
        f"this namespace labelled {MONITORING_LABEL}=true (the namespace's Prometheus). Empty: only the "
        "operator (and the node).",
    )


class DisruptionBudget(Model):
    """The PodDisruptionBudget, created when replicas > 1."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!(has(self.minAvailable) && has(self.maxUnavailable))",
                    "message": "set at most one of disruptionBudget.minAvailable and maxUnavailable",
                    "reason": "FieldValueForbidden",
                }
            ]
        }
    )

    enabled: bool = Field(True, description="Create a PodDisruptionBudget when replicas > 1.")
    max_unavailable: IntOrString | None = Field(None, description="Default 1 when minAvailable is unset.")
    min_available: IntOrString | None = Field(None, description="Alternative to maxUnavailable.")


class LocalObjectReference(Model):
    name: str = Field(..., min_length=1, description="Name of the object.")


class PodOverrides(Model):
    """Pod-level settings."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.drainAdmitSeconds + 2 <= self.terminationGracePeriodSeconds",
                    "message": "pod.drainAdmitSeconds must leave at least 2 s of "
                    "pod.terminationGracePeriodSeconds for in-flight calls and the exit",
                    "fieldPath": ".drainAdmitSeconds",
                    "reason": "FieldValueInvalid",
                }
            ]
        }
    )

    image_pull_secrets: list[LocalObjectReference] = Field(
        default_factory=list, max_length=16, description="Secrets for pulling the image."
    )
    service_account_name: str | None = Field(
        None, description="Use this ServiceAccount instead of the one the operator creates."
    )
    annotations: dict[str, str] = Field(default_factory=dict, description="Extra pod annotations.")
    labels: dict[str, str] = Field(
        default_factory=dict, description="Extra pod labels (the operator's own labels win)."
    )
    priority_class_name: str | None = Field(None, description="PriorityClass of the pods.")
    runtime_class_name: str | None = Field(
        None, max_length=253, description="RuntimeClass of the pods (e.g. 'nvidia' with the GPU operator)."
    )
    termination_grace_period_seconds: int = Field(
        30,
        ge=3,
        le=86400,
        description="The one shutdown budget: the pod's terminationGracePeriodSeconds, and the runtime's "
        "--shutdown-grace-secs (this minus 1 s to exit). After SIGTERM the peer is not ready at once, "
        "keeps serving for drainAdmitSeconds, then lets in-flight calls finish for the rest.",
    )
    drain_admit_seconds: int = Field(
        10,
        ge=0,
        le=3600,
        description="After SIGTERM, keep admitting new calls this long (not ready meanwhile) while the "
        "Service endpoints drop the pod; gRPC connections are also sent a graceful GOAWAY every "
        "drainAdmitSeconds/2 so open channels reconnect to a staying replica. Part of "
        "terminationGracePeriodSeconds. 0: refuse at once (calls racing the endpoint update fail).",
    )


class Rollout(Model):
    """How a spec change replaces the pods (the Deployment's strategy)."""

    strategy: Literal["Surge", "Recreate"] = Field(
        "Surge",
        description="Surge: start new pods first, stop an old pod only when a new one is ready "
        "(maxUnavailable 0): capacity never drops, but each surge pod needs room, a spare GPU for GPU "
        "peers (without one the rollout waits, the old pods serving). Recreate: stop an old pod, then "
        "start its replacement, one at a time (maxSurge 0, maxUnavailable 1): no spare needed, capacity "
        "drops by one pod meanwhile, and a one-replica peer is down until the new pod is ready.",
    )
    max_surge: int = Field(1, ge=1, le=1000, description="Surge: new pods started ahead of the old ones.")


class Probes(Model):
    """Probe timings of the admin port (/healthz, /readyz)."""

    startup_budget_seconds: int = Field(
        300,
        ge=10,
        le=86400,
        description="How long a pod may take to start (import the entrypoint, load a model) before the "
        "kubelet restarts it. Also bounds the Deployment's progress deadline (this + 300 s).",
    )
    liveness_period_seconds: int = Field(10, ge=1, le=3600, description="Liveness probe period.")
    liveness_failure_threshold: int = Field(
        3, ge=1, le=100, description="Failed liveness probes in a row before a restart."
    )
    readiness_period_seconds: int = Field(5, ge=1, le=3600, description="Readiness probe period.")
    readiness_failure_threshold: int = Field(
        2, ge=1, le=100, description="Failed readiness probes in a row before the pod leaves the endpoints."
    )
    timeout_seconds: int = Field(2, ge=1, le=60, description="Timeout of each probe.")


class Volume(BaseModel):
    """A pod volume as in a Pod's spec.volumes[] (persistentVolumeClaim, configMap, secret, emptyDir, csi),
    passed through."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )

    name: str = Field(
        ...,
        min_length=1,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="Volume name (tmp, home, dshm, tls and token are the operator's).",
    )

    def dump(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True, mode="json")


class VolumeMount(Model):
    """Where a spec.volumes entry appears in the peer container."""

    name: str = Field(..., min_length=1, max_length=63, description="Name of a spec.volumes entry.")
    mount_path: str = Field(..., min_length=1, pattern=r"^/", description="Absolute path in the container.")
    sub_path: str | None = Field(None, description="Sub-path of the volume to mount.")
    read_only: bool = Field(True, description="Mount read-only (the default: model weights are read).")


class EnvVar(Model):
    """A container environment variable."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!(has(self.value) && has(self.valueFrom))",
                    "message": "env: set value or valueFrom, not both",
                }
            ]
        }
    )

    name: str = Field(..., min_length=1, description="Variable name.")
    value: str | None = Field(None, description="Literal value.")
    value_from: FreeForm | None = Field(None, description="Source, as a Pod's env[].valueFrom.")


ENTRYPOINT_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*(:[A-Za-z_][A-Za-z0-9_.]*)?$"
STEP_PATTERN = r"^[A-Za-z0-9_.:/-]+$"
StepId = Annotated[str, Field(pattern=STEP_PATTERN, min_length=1, max_length=253)]


class BlazenPeerSpec(Model):
    """Desired state of a fleet of Blazen peers."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.tls.enabled || has(self.auth.tokenSecretRef)",
                    "message": "with tls.enabled=false a token (auth.tokenSecretRef) is required; "
                    "the runtime "
                    "refuses to serve with neither",
                    "fieldPath": ".auth.tokenSecretRef",
                    "reason": "FieldValueRequired",
                },
                {
                    "rule": "size([self.ports.grpc, self.ports.http, self.ports.admin, "
                    "self.ports.plaintextGrpc].filter(p, p == self.ports.grpc)) == 1 && "
                    "size([self.ports.http, self.ports.admin, self.ports.plaintextGrpc]"
                    ".filter(p, p == self.ports.http)) == 1 && "
                    "self.ports.admin != self.ports.plaintextGrpc",
                    "message": "ports must be distinct",
                    "fieldPath": ".ports",
                    "reason": "FieldValueDuplicate",
                },
                {
                    "rule": "!has(self.volumes) || self.volumes.all(v, !(v.name in "
                    + str(list(RESERVED_VOLUMES)).replace("'", '"')
                    + "))",
                    "message": "spec.volumes: the names "
                    + ", ".join(RESERVED_VOLUMES)
                    + " are the operator's",
                    "fieldPath": ".volumes",
                    "reason": "FieldValueInvalid",
                },
                {
                    "rule": "!has(self.volumeMounts) || self.volumeMounts.all(m, has(self.volumes) && "
                    "self.volumes.exists(v, v.name == m.name))",
                    "message": "spec.volumeMounts: every name must be a spec.volumes entry",
                    "fieldPath": ".volumeMounts",
                    "reason": "FieldValueInvalid",
                },
                {
                    "rule": "!self.tls.enabled || !has(self.tls.issuerRef) || has(self.tls.trustBundle) || "
                    "has(self.auth.tokenSecretRef)",
                    "message": "with tls.issuerRef and no tls.trustBundle a token (auth.tokenSecretRef) is "
                    "required: the issuer may write no ca.crt (ACME), so callers are not asked for client "
                    "certificates and the token authenticates them; or set tls.trustBundle for mutual TLS",
                    "fieldPath": ".auth.tokenSecretRef",
                    "reason": "FieldValueRequired",
                },
                {
                    "rule": "!has(self.http.auth) || self.http.auth != 'Token' || "
                    "has(self.auth.tokenSecretRef)",
                    "message": "spec.http.auth Token needs a token: set auth.tokenSecretRef",
                    "fieldPath": ".http.auth",
                    "reason": "FieldValueInvalid",
                },
                {
                    "rule": "!has(self.http.auth) || self.http.auth != 'ClientCertificate' || "
                    "self.tls.enabled",
                    "message": "spec.http.auth ClientCertificate needs tls.enabled",
                    "fieldPath": ".http.auth",
                    "reason": "FieldValueInvalid",
                },
                {
                    "rule": "!has(self.http.auth) || self.http.auth != 'ClientCertificate' || "
                    "!has(self.tls.issuerRef) || has(self.tls.trustBundle)",
                    "message": "spec.http.auth ClientCertificate with tls.issuerRef needs tls.trustBundle "
                    "(the CA client certificates are verified against)",
                    "fieldPath": ".http.auth",
                    "reason": "FieldValueInvalid",
                },
                {
                    "rule": "self.hardware.gpu == 0 || !has(self.resources.limits) || "
                    "!(self.hardware.gpuResourceName in self.resources.limits)",
                    "message": "set the GPU count with hardware.gpu, not in resources.limits",
                    "fieldPath": ".resources.limits",
                    "reason": "FieldValueForbidden",
                },
            ]
        }
    )

    image: str = Field(..., min_length=1, description="Container image with blazen-peer and the step code.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        None, description="Image pull policy."
    )
    entrypoint: str = Field(
        ...,
        pattern=ENTRYPOINT_PATTERN,
        description="MODULE[:ATTR] imported at start; it registers the steps (blazen-peer --entrypoint).",
    )
    steps: list[StepId] | None = Field(
        None,
        min_length=1,
        max_length=512,
        description="Allow-list of step ids this peer serves (--steps). Unset: every registered step.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    replicas: int = Field(1, ge=0, le=1000, description="Number of peer pods (scale subresource).")
    resources: ResourceRequirements = Field(
        default_factory=ResourceRequirements, description="Container compute resources."
    )
    hardware: Hardware = Field(default_factory=Hardware, description="GPUs and node-pool placement.")
    node_selector: dict[str, str] | None = Field(
        None, description="Extra node selector, merged over hardware.poolSelector (these keys win)."
    )
    tolerations: list[Toleration] | None = Field(
        None, max_length=64, description="Extra tolerations, appended to the GPU toleration."
    )
    affinity: FreeForm | None = Field(None, description="Pod affinity, as a Pod's spec.affinity.")
    tls: TLS = Field(default_factory=TLS, description="TLS for gRPC and HTTP via cert-manager.")
    auth: Auth = Field(default_factory=Auth, description="Bearer-token authentication.")
    http: Http = Field(default_factory=Http, description="The HTTP/JSON shim.")
    ports: Ports = Field(default_factory=Ports, description="Listener ports.")
    env: list[EnvVar] | None = Field(
        None, max_length=256, description="Extra environment variables of the peer container."
    )
    plaintext_grpc: PlaintextGrpc = Field(
        default_factory=PlaintextGrpc, description="Opt-in plaintext gRPC for Blazen's own clients."
    )
    network_policy: NetworkPolicy = Field(default_factory=NetworkPolicy, description="Ingress NetworkPolicy.")
    disruption_budget: DisruptionBudget = Field(
        default_factory=DisruptionBudget, description="PodDisruptionBudget (replicas > 1 only)."
    )
    pod: PodOverrides = Field(default_factory=PodOverrides, description="Pod-level settings.")
    rollout: Rollout = Field(default_factory=Rollout, description="How spec changes replace the pods.")
    probes: Probes = Field(default_factory=Probes, description="Probe timings and the startup budget.")
    volumes: list[Volume] | None = Field(
        None, max_length=64, description="Extra pod volumes (model weights, caches, configuration)."
    )
    volume_mounts: list[VolumeMount] | None = Field(
        None, max_length=64, description="Mounts of spec.volumes in the peer container."
    )
    shm_size: Quantity | None = Field(
        None,
        description="Size of a memory-backed /dev/shm (counts against the memory limit). Unset: 1Gi for "
        "GPU peers (PyTorch and NCCL need more than the runtime's 64 MiB), none otherwise.",
    )
    scratch_size_limit: Quantity = Field(
        "4Gi",
        description="sizeLimit of each writable emptyDir under the read-only root (/tmp, and HOME "
        "/home/blazen with its .cache): a pod writing more is evicted instead of filling the node.",
    )
    topology_spread_constraints: list[FreeForm] | None = Field(
        None,
        max_length=16,
        description="As a Pod's topologySpreadConstraints. Unset: spread the current revision's pods "
        "across nodes and zones (maxSkew 1, ScheduleAnyway); [] for none.",
    )


# ------------------------------------------------------------ status


class Condition(Model):
    """A status condition in the Kubernetes convention."""

    type: str = Field(
        ..., description="Ready, Available, Progressing, CertificateReady, Degraded or CARotation."
    )
    status: Literal["True", "False", "Unknown"] = Field(..., description="True, False or Unknown.")
    reason: str = Field(..., description="CamelCase reason.")
    message: str = Field("", description="Human-readable detail.")
    last_transition_time: str = Field(..., description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(None, description="Spec generation this condition reflects.")


class Endpoints(Model):
    """Where clients reach the peers."""

    grpc: str | None = Field(None, description="gRPC endpoint host:port (TLS when enabled).")
    http: str | None = Field(None, description="HTTP shim URL.")
    plaintext_grpc: str | None = Field(None, description="Plaintext gRPC endpoint, when enabled.")
    headless: str | None = Field(
        None,
        description="Headless Service DNS name: every pod, starting and stopping ones included (sibling "
        "discovery; load-balance through the grpc endpoint).",
    )


class CertificateStatus(Model):
    """The serving Certificate as reported by cert-manager."""

    name: str | None = Field(None, description="Certificate name.")
    secret_name: str | None = Field(None, description="Secret with tls.crt / tls.key / ca.crt.")
    client_secret_name: str | None = Field(None, description="Client certificate Secret callers can mount.")
    ready: bool | None = Field(None, description="Certificate Ready condition.")
    not_after: str | None = Field(None, description="Expiry of the current certificate.")
    renewal_time: str | None = Field(None, description="When cert-manager renews it.")


class BlazenPeerStatus(Model):
    """Observed state, computed from the children on every reconcile."""

    observed_generation: int | None = Field(None, description="Generation of the spec last reconciled.")
    phase: Literal["Pending", "Progressing", "Ready", "Degraded", "Invalid"] | None = Field(
        None, description="Summary: Pending, Progressing, Ready, Degraded or Invalid."
    )
    replicas: int | None = Field(None, description="Pods that exist (scale subresource).")
    updated_replicas: int | None = Field(None, description="Pods on the current template.")
    ready_replicas: int | None = Field(None, description="Pods ready.")
    selector: str | None = Field(None, description="Label selector of the pods (scale subresource).")
    config_hash: str | None = Field(None, description="Hash of everything that shapes the pods.")
    endpoints: Endpoints | None = Field(None, description="Client endpoints.")
    certificate: CertificateStatus | None = Field(None, description="Serving certificate.")
    served_steps: list[str] | None = Field(
        None,
        description="Step ids the ready pods report on /v1/info. Absent when no ready pod answered "
        "(unknown).",
    )
    steps_unknown_pods: int | None = Field(None, description="Ready pods whose /v1/info could not be read.")
    session_refs: dict[str, int] | None = Field(
        None,
        description="Live session refs per ready pod, as each reports on /v1/info (pods that did not answer "
        "are absent). Also each pod's controller.kubernetes.io/pod-deletion-cost, so a scale-down "
        "removes pods without refs first.",
    )
    conditions: list[Condition] | None = Field(
        None,
        description="Ready, Available, Progressing, CertificateReady, Degraded; CARotation (namespace CA "
        "only: True while a CA rotation runs, reason = its phase, message = its progress and this peer's "
        "pods it waits for).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )


def parse_spec(spec: dict[str, Any] | None) -> BlazenPeerSpec:
    """Parse (and default) a spec as it comes from the API; raises pydantic.ValidationError."""
    return BlazenPeerSpec.model_validate(dict(spec or {}))
