"""The BlazenPeer spec and status as pydantic models.

These models are the single source of truth: ``crdgen`` turns them into the CRD's OpenAPI schema
(descriptions, defaults, CEL rules included), and the handlers parse every object through them.
Field names are camelCase on the
wire (aliases) and snake_case in Python.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

GROUP = "blazen.dev"
VERSION = "v1alpha1"
KIND = "BlazenPeer"
PLURAL = "blazenpeers"
SINGULAR = "blazenpeer"
SHORT_NAMES = ["bp"]
API_VERSION = f"{GROUP}/{VERSION}"

DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"
DEFAULT_GPU_POOL_SELECTOR = {"nvidia.com/gpu.present": "true"}

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
        description="GPUs per pod. Above 0 the pod requests and limits that many of gpuResourceName, selects "
        "the GPU pool (poolSelector) and tolerates the GPU taint.",
    )
    gpu_resource_name: str = Field(
        DEFAULT_GPU_RESOURCE,
        min_length=1,
        max_length=253,
        description="Extended resource name of the GPU device plugin.",
    )
    pool_selector: dict[str, str] | None = Field(
        None,
        description="Node labels that select the GPU pool. Unset: {nvidia.com/gpu.present: 'true'} "
        "when gpu > 0; "
        "set to {} to select no pool. Merged under spec.nodeSelector.",
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
                }
            ]
        }
    )

    enabled: bool = Field(
        True, description="Serve gRPC and HTTP over TLS. Turning it off requires auth.tokenSecretRef."
    )
    issuer_ref: IssuerRef | None = Field(
        None,
        description="Issuer of the peer certificates. Unset: the operator bootstraps a namespace CA "
        "(self-signed Issuer 'blazen-selfsigned' -> CA Certificate 'blazen-ca' -> CA Issuer 'blazen-ca').",
    )
    duration: str = Field(
        "2160h",
        max_length=32,
        pattern=r"^([0-9]+(\.[0-9]+)?(h|m|s|ms))+$",
        description="Requested certificate lifetime (Go duration, e.g. 2160h).",
    )
    renew_before: str = Field(
        "360h",
        max_length=32,
        pattern=r"^([0-9]+(\.[0-9]+)?(h|m|s|ms))+$",
        description="Renew this long before expiry (Go duration). The runtime reloads renewed files "
        "in place.",
    )


class SecretKeyRef(Model):
    """A key in a Secret of the BlazenPeer's namespace."""

    name: str = Field(..., min_length=1, description="Secret name.")
    key: str = Field("token", min_length=1, description="Key holding the bearer token.")


class Auth(Model):
    """Bearer-token authentication."""

    token_secret_ref: SecretKeyRef | None = Field(
        None,
        description="Secret key with the bearer token, mounted at /etc/blazen/token/token. A change to the "
        "Secret's data rolls the pods.",
    )


class Http(Model):
    """The HTTP/JSON shim."""

    enabled: bool = Field(True, description="Serve the HTTP/JSON shim (HTTPS when TLS is on).")
    cors_origins: list[Annotated[str, Field(max_length=512)]] = Field(
        default_factory=list, max_length=32, description="Origins allowed by CORS (--cors-allow-origin)."
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


class NetworkPolicy(Model):
    """The optional ingress NetworkPolicy."""

    enabled: bool = Field(
        False, description="Create a NetworkPolicy (always created when plaintextGrpc is on)."
    )
    allowed_from: list[NetworkPeer] = Field(
        default_factory=list,
        max_length=32,
        description="Who may reach the gRPC and HTTP ports besides the peer's own pods; "
        "empty admits everyone.",
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
    """Escape hatch for pod-level settings."""

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
    termination_grace_period_seconds: int | None = Field(None, ge=0, description="Grace period on stop.")


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
    steps: list[Annotated[str, Field(pattern=STEP_PATTERN, min_length=1, max_length=253)]] | None = Field(
        None,
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
    pod: PodOverrides = Field(default_factory=PodOverrides, description="Pod-level overrides.")


# ------------------------------------------------------------ status


class Condition(Model):
    """A status condition in the Kubernetes convention."""

    type: str = Field(..., description="Ready, Available, Progressing, CertificateReady or Degraded.")
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
    headless: str | None = Field(None, description="Headless Service DNS name (per-pod addressing).")


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
    conditions: list[Condition] | None = Field(
        None,
        description="Ready, Available, Progressing, CertificateReady, Degraded.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )


def parse_spec(spec: dict[str, Any] | None) -> BlazenPeerSpec:
    """Parse (and default) a spec as it comes from the API; raises pydantic.ValidationError."""
    return BlazenPeerSpec.model_validate(dict(spec or {}))
