"""The BlazenFleet spec and status as pydantic models, built from the BlazenPeer's.

A fleet is pools of peers behind one router. Every pool becomes a BlazenPeer, so the pool fields ARE the
BlazenPeer fields: each is declared here with the BlazenPeer field's own definition (description,
constraints, schema extras), only made optional and without a default, so that an unset field means "take
the fleet's" (and, unset there too, the BlazenPeer default). tests/unit/test_fleet_spec.py checks that every
shared field's schema equals the BlazenPeer's.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator
from pydantic.fields import FieldInfo

from . import spec as s

KIND = "BlazenFleet"
PLURAL = "blazenfleets"
SINGULAR = "blazenfleet"
SHORT_NAMES = ["bf"]

FLEET_LABEL = "blazen.dev/fleet"
POOL_LABEL = "blazen.dev/pool"
COMPONENT_LABEL = "blazen.dev/component"
# A BlazenPeer's name is <fleet>-<pool> and at most 52 characters (its own CEL rule).
MAX_PEER_NAME = 52
# Pool names are DNS labels; "router" would give the pool's children the router's names (<fleet>-router),
# "client" the pool's serving certificate the fleet's callers' (<fleet>-client-tls).
POOL_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
RESERVED_POOL_NAMES = ("router", "client")

_PEER = s.BlazenPeerSpec.model_fields


def _optional(name: str) -> Any:
    """The BlazenPeer field ``name`` without its default: unset means inherited."""
    return FieldInfo.merge_field_infos(_PEER[name], default=None, default_factory=None)


def _same(name: str) -> Any:
    """The BlazenPeer field ``name`` as it is, default included."""
    return FieldInfo.merge_field_infos(_PEER[name])


class PeerFields(s.Model):
    """The BlazenPeer fields a fleet sets for all its pools and a pool may override. A pool's field replaces
    the fleet's as a whole (a pool's `resources` is its resources; nothing of the fleet's is merged in)."""

    image: str | None = _optional("image")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = _optional("image_pull_policy")
    entrypoint: str | None = _optional("entrypoint")
    steps: list[s.StepId] | None = _optional("steps")
    resources: s.ResourceRequirements | None = _optional("resources")
    hardware: s.Hardware | None = _optional("hardware")
    node_selector: dict[str, str] | None = _optional("node_selector")
    tolerations: list[s.Toleration] | None = _optional("tolerations")
    affinity: s.FreeForm | None = _optional("affinity")
    http: s.Http | None = _optional("http")
    ports: s.Ports | None = _optional("ports")
    env: list[s.EnvVar] | None = _optional("env")
    plaintext_grpc: s.PlaintextGrpc | None = _optional("plaintext_grpc")
    network_policy: s.NetworkPolicy | None = _optional("network_policy")
    disruption_budget: s.DisruptionBudget | None = _optional("disruption_budget")
    pod: s.PodOverrides | None = _optional("pod")
    rollout: s.Rollout | None = _optional("rollout")
    probes: s.Probes | None = _optional("probes")
    volumes: list[s.Volume] | None = _optional("volumes")
    volume_mounts: list[s.VolumeMount] | None = _optional("volume_mounts")
    shm_size: s.Quantity | None = _optional("shm_size")
    scratch_size_limit: s.Quantity | None = _optional("scratch_size_limit")
    topology_spread_constraints: list[s.FreeForm] | None = _optional("topology_spread_constraints")


class FleetPool(PeerFields):
    """One pool: a BlazenPeer named <fleet>-<name>. Fields set here override the fleet's."""

    name: str = Field(
        ...,
        min_length=1,
        max_length=MAX_PEER_NAME - 2,
        pattern=POOL_NAME_PATTERN,
        description="Pool name, a DNS label: the BlazenPeer is <fleet>-<name>, labelled "
        f"{POOL_LABEL}=<name>. Not 'router' nor 'client'.",
    )
    replicas: int | None = Field(
        None,
        ge=0,
        le=1000,
        description="Pods of the pool. The fleet sets the BlazenPeer's spec.replicas when it creates it and "
        "whenever this value changes; in between `kubectl scale bp/<fleet>-<pool>` or an HPA own it. "
        "Unset: 1 at creation.",
    )


class FleetRouter(s.Model):
    """The router Deployment (`blazen-peer route --fleet`) behind the Service <fleet>. Its TLS and token are
    the fleet's (spec.tls, spec.auth); its certificate is also the client identity it presents to the
    pools."""

    replicas: int = Field(
        2, ge=0, le=100, description="Router pods. Above 1 a PodDisruptionBudget keeps one serving."
    )
    image: str | None = Field(
        None,
        min_length=1,
        description="Router image (runs `blazen-peer route`). Unset: spec.image, which carries blazen-peer.",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = _same("image_pull_policy")
    max_concurrent_workflows: int | None = Field(
        None,
        ge=0,
        le=1_000_000,
        description="Calls each router pod forwards at once (Invoke, Stream, Deref, Release; "
        "`--max-concurrent-workflows`); more are refused RESOURCE_EXHAUSTED / 429. 0: no cap. Unset: the "
        "runtime's default (64).",
    )
    resources: s.ResourceRequirements = _same("resources")
    http: s.Http = _same("http")
    ports: s.Ports = _same("ports")
    plaintext_grpc: s.PlaintextGrpc = _same("plaintext_grpc")
    network_policy: s.NetworkPolicy = _same("network_policy")
    disruption_budget: s.DisruptionBudget = _same("disruption_budget")
    pod: s.PodOverrides = _same("pod")
    probes: s.Probes = _same("probes")
    node_selector: dict[str, str] | None = _same("node_selector")
    tolerations: list[s.Toleration] | None = _same("tolerations")
    affinity: s.FreeForm | None = _same("affinity")
    topology_spread_constraints: list[s.FreeForm] | None = _same("topology_spread_constraints")


def _rule(rule: str, message: str, field_path: str, reason: str = "FieldValueInvalid") -> Any:
    return {"rule": rule, "message": message, "fieldPath": field_path, "reason": reason}


def _peer_rules() -> list[Any]:
    """The BlazenPeer's cross-field rules that read only fleet-wide fields (tls, auth) hold for the fleet as
    they are; those that also read http hold for the router's http (spec.router.http)."""
    out: list[Any] = []
    extra: Any = s.BlazenPeerSpec.model_config["json_schema_extra"]
    rules: list[dict[str, str]] = extra["x-kubernetes-validations"]
    for rule in rules:
        fields = set(re.findall(r"self\.(\w+)", rule["rule"]))
        if fields <= {"tls", "auth"}:
            out.append(rule)
        elif fields <= {"tls", "auth", "http"}:
            out.append(
                {
                    **rule,
                    "rule": rule["rule"].replace("self.http", "self.router.http"),
                    "message": rule["message"].replace("spec.http", "spec.router.http"),
                    "fieldPath": ".router" + rule["fieldPath"],
                }
            )
    return out


class BlazenFleetSpec(PeerFields):
    """Desired state of a fleet: pools of Blazen peers behind one router endpoint."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _rule(
                    "has(self.image) || self.pools.all(p, has(p.image))",
                    "spec.image is required unless every pool sets spec.pools[].image",
                    ".image",
                    "FieldValueRequired",
                ),
                _rule(
                    "has(self.entrypoint) || self.pools.all(p, has(p.entrypoint))",
                    "spec.entrypoint is required unless every pool sets spec.pools[].entrypoint",
                    ".entrypoint",
                    "FieldValueRequired",
                ),
                _rule(
                    "has(self.image) || has(self.router.image)",
                    "spec.router.image is required when spec.image is unset",
                    ".router.image",
                    "FieldValueRequired",
                ),
                _rule(
                    "self.pools.all(p, !(p.name in "
                    + str(list(RESERVED_POOL_NAMES)).replace("'", '"')
                    + "))",
                    "spec.pools[].name: 'router' and 'client' are reserved (<fleet>-router is the router's "
                    "Deployment, <fleet>-client-tls the fleet's client certificate)",
                    ".pools",
                ),
                *_peer_rules(),
            ]
        }
    )

    tls: s.TLS = Field(
        default_factory=s.TLS,
        description="TLS of the router and every pool (one issuer: the pools accept the router's "
        "certificate as a client identity).",
    )
    auth: s.Auth = Field(
        default_factory=s.Auth,
        description="Bearer token of the router and every pool (the router sends it to the pools).",
    )
    pools: list[FleetPool] = Field(
        ...,
        min_length=1,
        max_length=32,
        description="The pools, each a BlazenPeer <fleet>-<name> with the fleet's fields overridden by the "
        "pool's. Names are unique.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    router: FleetRouter = Field(default_factory=FleetRouter, description="The router in front of the pools.")

    @model_validator(mode="after")
    def _pool_names(self) -> BlazenFleetSpec:
        # The CRD's list-map and CEL rule say the same; this covers objects that reach the operator otherwise.
        names = [p.name for p in self.pools]
        if len(set(names)) != len(names):
            raise ValueError("pools: names must be unique")
        if reserved := set(names) & set(RESERVED_POOL_NAMES):
            raise ValueError(f"pools: {', '.join(sorted(reserved))} is reserved")
        return self


# The BlazenPeer fields a pool inherits from the fleet; tls and auth are fleet-wide (one identity and token
# for router and pools); replicas and name are the pool's own.
INHERITED = tuple(PeerFields.model_fields)


# ------------------------------------------------------------ status


class PoolStatus(s.Model):
    """One pool as its BlazenPeer reports it."""

    name: str = Field(..., description="Pool name.")
    peer: str = Field(..., description="The pool's BlazenPeer.")
    replicas: int | None = Field(None, description="Desired pods (the BlazenPeer's spec.replicas).")
    ready_replicas: int | None = Field(None, description="Ready pods.")
    ready: bool | None = Field(None, description="The BlazenPeer's Ready condition is True.")
    served_steps: list[str] | None = Field(
        None, description="Step ids its ready pods serve (the BlazenPeer's status.servedSteps)."
    )
    unserved_steps: list[str] | None = Field(
        None, description="Step ids the pool was told to serve (steps) that no ready pod serves."
    )


class RouterStatus(s.Model):
    """The router Deployment."""

    replicas: int | None = Field(None, description="Desired router pods.")
    ready_replicas: int | None = Field(None, description="Ready router pods.")
    split_runs: dict[str, int] | None = Field(
        None,
        description="Runs split over pools (step ids no single pool serves), by outcome (ok, error, timeout, "
        "failed), summed over the ready router pods since each started, as their /v1/info reports (read at "
        "most once per resync period). Absent when no router pod answered.",
    )
    split_steps: dict[str, int] | None = Field(
        None,
        description="Steps of split runs run on each pool (one hop each: router -> replica -> router), "
        "summed as splitRuns.",
    )


class BlazenFleetStatus(s.Model):
    """Observed state, computed from the pools' BlazenPeers and the router's children on every reconcile."""

    observed_generation: int | None = Field(None, description="Generation of the spec last reconciled.")
    phase: Literal["Pending", "Progressing", "Ready", "Degraded", "Invalid"] | None = Field(
        None, description="Summary: Pending, Progressing, Ready, Degraded or Invalid."
    )
    pools: list[PoolStatus] | None = Field(
        None,
        description="Each pool's replicas and steps.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    ready_pools: str | None = Field(None, description="Pools with a ready pod, of all pools (e.g. 2/2).")
    routes: dict[str, list[str]] | None = Field(
        None, description="Routing table: step id -> the pools whose ready pods serve it."
    )
    router: RouterStatus | None = Field(None, description="The router Deployment.")
    endpoints: s.Endpoints | None = Field(None, description="The router Service: the fleet's one endpoint.")
    certificate: s.CertificateStatus | None = Field(None, description="The router's certificate.")
    conditions: list[s.Condition] | None = Field(
        None,
        description="Ready, Routable, Degraded.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )


def parse_spec(spec: dict[str, Any] | None) -> BlazenFleetSpec:
    """Parse (and default) a spec as it comes from the API; raises pydantic.ValidationError."""
    return BlazenFleetSpec.model_validate(dict(spec or {}))
