"""Status as a pure function of the observed objects.

``compute`` takes the BlazenPeer's generation and spec, the Deployment, the serving Certificate, what the
ready pods report on ``/v1/info`` and the previous status, and returns the new status (wire form). Nothing
here talks to the API; ``transitions`` says which Events a status change deserves.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Literal

from .builders import Peer, workload
from .builders import common as c
from .spec import BlazenPeerStatus, CertificateStatus, Condition, Endpoints

# (status, reason, message) of one condition
Cond = tuple[Literal["True", "False", "Unknown"], str, str]
CONDITION_TYPES = ("Ready", "Available", "Progressing", "CertificateReady", "Degraded", "CARotation")


@dataclass(frozen=True)
class PodReport:
    """One pod of the peer as observed: is it ready, and what did its /v1/info say (None: no answer)."""

    name: str
    ready: bool
    info: dict[str, Any] | None = None


@dataclass(frozen=True)
class Observed:
    generation: int
    peer: Peer | None  # None when the spec is invalid
    invalid: str | None = None  # why the spec is invalid
    apply_error: str | None = None  # a child the API server refused
    conflict: str | None = None  # a child's name is taken by an object this BlazenPeer does not own
    token_missing: str | None = None  # the referenced token Secret (or key) does not exist
    deployment: dict[str, Any] | None = None
    certificate: dict[str, Any] | None = None
    pods: tuple[PodReport, ...] = ()
    ca_rotation: Cond | None = None  # its trust bundle's CA rotation as this peer sees it (trust.View)


@dataclass(frozen=True)
class Transition:
    type: str  # Normal | Warning
    reason: str
    message: str


def _now(now: dt.datetime | None) -> str:
    now = now or dt.datetime.now(dt.UTC)
    return now.astimezone(dt.UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cond(obj: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return cond
    return None


def certificate_state(peer: Peer, cert: dict[str, Any] | None) -> Cond:
    """(status, reason, message) of CertificateReady. A Certificate counts as Ready only when its Ready
    condition is True *and* reflects the Certificate's current generation (a spec change re-issues it)."""
    if not peer.spec.tls.enabled:
        return "True", "TLSDisabled", "TLS is off; the peers authenticate callers with a bearer token"
    name = c.server_cert_name(peer)
    if cert is None:
        return "False", "CertificateMissing", f"Certificate {name} does not exist yet"
    ready = _cond(cert, "Ready")
    if ready is None:
        return "False", "CertificatePending", f"cert-manager has not reported on Certificate {name} yet"
    gen = (cert.get("metadata") or {}).get("generation")
    cond_gen = ready.get("observedGeneration")
    if ready.get("status") == "True":
        if gen is not None and cond_gen is not None and cond_gen < gen:
            return "False", "CertificateReissuing", f"Certificate {name} changed; waiting for re-issue"
        return "True", "CertificateIssued", ready.get("message") or f"Certificate {name} is ready"
    reason = ready.get("reason") or "NotReady"
    if not reason.startswith("Certificate"):
        reason = f"Certificate{reason}"
    return "False", reason, ready.get("message") or ""


CERT_FAILURES = ("CertificateFailed", "CertificateExpired")


def session_refs(info: dict[str, Any] | None) -> int | None:
    """The live session refs a pod reported on /v1/info (None: not reported, e.g. an older runtime)."""
    value = (info or {}).get("session_refs")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


@dataclass(frozen=True)
class Rollout:
    """The Deployment as the conditions see it."""

    deployment: dict[str, Any] | None
    desired: int
    config_hash: str
    replicas: int
    ready: int
    updated: int
    available: int

    @classmethod
    def of(cls, deployment: dict[str, Any] | None, desired: int, config_hash: str) -> Rollout:
        st = (deployment or {}).get("status") or {}
        return cls(
            deployment=deployment,
            desired=desired,
            config_hash=config_hash,
            replicas=int(st.get("replicas") or 0),
            ready=int(st.get("readyReplicas") or 0),
            updated=int(st.get("updatedReplicas") or 0),
            available=int(st.get("availableReplicas") or 0),
        )

    @property
    def exists(self) -> bool:
        return self.deployment is not None

    @property
    def rolled_out(self) -> bool:
        """The Deployment carries this spec (not a stale read or someone else's template), the controller has
        seen it, and every pod is new and ready: the current spec serves."""
        dep = self.deployment
        if dep is None:
            return False
        annotations = ((dep.get("spec") or {}).get("template") or {}).get("metadata", {}).get("annotations")
        template_current = (annotations or {}).get(c.CONFIG_HASH_ANNOTATION) == self.config_hash
        observed = ((dep.get("status") or {}).get("observedGeneration")) or 0
        current = observed >= ((dep.get("metadata") or {}).get("generation") or 0)
        return template_current and current and self.desired == self.updated == self.replicas == self.ready

    def condition(self, type_: str) -> dict[str, Any] | None:
        return _cond(self.deployment, type_)

    @property
    def deadline_exceeded(self) -> dict[str, Any] | None:
        """The Progressing condition when the rollout's progress deadline passed."""
        progress = self.condition("Progressing")
        return progress if progress and progress.get("reason") == "ProgressDeadlineExceeded" else None


def endpoints(peer: Peer) -> Endpoints:
    sp = peer.spec
    out = Endpoints(grpc=f"{c.svc_host(peer)}:{sp.ports.grpc}", headless=c.headless_host(peer))
    if sp.http.enabled:
        scheme = "https" if sp.tls.enabled else "http"
        out.http = f"{scheme}://{c.svc_host(peer)}:{sp.ports.http}"
    if sp.plaintext_grpc.enabled:
        out.plaintext_grpc = f"{c.svc_host(peer)}:{sp.ports.plaintext_grpc}"
    return out


def certificate_status(peer: Peer, cert: dict[str, Any] | None, ready: bool) -> CertificateStatus | None:
    if not peer.spec.tls.enabled:
        return None
    cstat = (cert or {}).get("status") or {}
    return CertificateStatus(
        name=c.server_cert_name(peer),
        secret_name=c.server_cert_name(peer),
        client_secret_name=c.client_cert_name(peer),
        ready=ready,
        not_after=cstat.get("notAfter") or None,
        renewal_time=cstat.get("renewalTime") or None,
    )


def served_steps(pods: tuple[PodReport, ...]) -> tuple[list[str] | None, int | None]:
    """(union of the step ids the ready pods report or None when none answered, ready pods that did not)."""
    ready = [p for p in pods if p.ready]
    steps = [p.info["steps"] for p in ready if p.info is not None and isinstance(p.info.get("steps"), list)]
    served = sorted({str(x) for s in steps for x in s}) if steps else None
    return served, (len(ready) - len(steps) if ready else None)


def session_refs_by_pod(pods: tuple[PodReport, ...]) -> dict[str, int] | None:
    refs = {p.name: r for p in pods if p.ready and (r := session_refs(p.info)) is not None}
    return refs or None


def available(peer: Peer, r: Rollout) -> Cond:
    if not r.exists:
        return "False", "DeploymentMissing", f"Deployment {c.deployment_name(peer)} not created yet"
    if r.desired == 0:
        return "True", "ScaledToZero", "spec.replicas is 0"
    cond = r.condition("Available")
    if cond is not None and cond.get("status") == "True" and r.available > 0:
        if r.rolled_out:
            return "True", "MinimumReplicasAvailable", f"{r.available}/{r.desired} pods available"
        # callers are served, but not by pods of the current spec (yet)
        msg = f"{r.available} pods available, {r.updated}/{r.desired} on the current template"
        return "True", "PreviousPodsServing", msg
    return "False", "MinimumReplicasUnavailable", f"{r.available}/{r.desired} pods available"


def progressing(r: Rollout) -> Cond:
    if not r.exists:
        return "True", "Creating", "creating the peer Deployment"
    if (deadline := r.deadline_exceeded) is not None:
        return "False", "ProgressDeadlineExceeded", deadline.get("message") or ""
    if not r.rolled_out:
        detail = f"{r.updated}/{r.desired} pods updated, {r.ready}/{r.desired} ready, {r.replicas} total"
        return "True", "RollingOut", detail
    return "False", "RolloutComplete", f"{r.desired} pods on the current template"


def degraded_reasons(
    observed: Observed, peer: Peer, r: Rollout, cert: Cond, served: list[str] | None
) -> list[tuple[str, str]]:
    """(reason, message) of everything wrong, most actionable first."""
    out: list[tuple[str, str]] = []
    if observed.conflict:
        out.append(("ChildNotOwned", observed.conflict))
    if observed.apply_error:
        out.append(("ApplyFailed", observed.apply_error))
    if observed.token_missing:
        out.append(("TokenSecretMissing", observed.token_missing))
    if (deadline := r.deadline_exceeded) is not None:
        out.append(("ProgressDeadlineExceeded", deadline.get("message") or ""))
    failure = r.condition("ReplicaFailure")
    if failure is not None and failure.get("status") == "True":
        out.append(("ReplicaFailure", failure.get("message") or ""))
    cert_status, cert_reason, cert_msg = cert
    if cert_status == "False" and cert_reason in CERT_FAILURES:
        out.append((cert_reason, cert_msg))
    if peer.spec.steps is not None and served is not None:
        missing = sorted(set(peer.spec.steps) - set(served))
        if missing:
            out.append(("StepsNotServed", f"spec.steps not served by the ready pods: {', '.join(missing)}"))
    return out


def degraded(reasons: list[tuple[str, str]]) -> Cond:
    if not reasons:
        return "False", "AsExpected", ""
    return "True", reasons[0][0], "; ".join(m for _, m in reasons if m) or reasons[0][0]


def ready(degraded_cond: Cond, r: Rollout, cert: Cond) -> Cond:
    """Everything rolled out, certificates issued, nothing degraded."""
    if degraded_cond[0] == "True":
        return "False", degraded_cond[1], degraded_cond[2]
    if not r.exists:
        return "False", "DeploymentMissing", "the peer Deployment does not exist yet"
    if cert[0] != "True":
        return "False", "CertificateNotReady", cert[2]
    if not r.rolled_out:
        return "False", "PodsNotReady", f"{r.ready}/{r.desired} pods ready on the current template"
    if r.desired == 0:
        return "True", "ScaledToZero", "spec.replicas is 0"
    return "True", "AllPodsReady", f"{r.ready}/{r.desired} pods ready"


def phase(
    degraded_cond: Cond, ready_cond: Cond, r: Rollout
) -> Literal["Pending", "Progressing", "Ready", "Degraded"]:
    if degraded_cond[0] == "True":
        return "Degraded"
    if ready_cond[0] == "True":
        return "Ready"
    return "Progressing" if r.exists else "Pending"


def invalid(observed: Observed, previous: dict[str, Any], stamp: str) -> dict[str, Any]:
    """The status of a spec the models reject: what we knew of the running children is kept; the old pods
    keep serving."""
    msg = observed.invalid or "invalid spec"
    conds: dict[str, Cond] = {
        "Ready": ("False", "InvalidSpec", msg),
        "Degraded": ("True", "InvalidSpec", msg),
    }
    keys = ("replicas", "readyReplicas", "selector", "endpoints", "certificate")
    kept = {k: previous[k] for k in keys if k in previous}
    out = BlazenPeerStatus.model_validate(
        {**kept, "observedGeneration": observed.generation, "phase": "Invalid"}
    )
    return _finish(out, conds, previous, stamp, observed.generation)


def compute(
    observed: Observed,
    previous: dict[str, Any] | None = None,
    now: dt.datetime | None = None,
) -> dict[str, Any]:
    """The new status (camelCase dict). ``previous`` keeps lastTransitionTime stable while a condition's
    status is unchanged."""
    previous = previous or {}
    stamp = _now(now)
    peer = observed.peer
    if peer is None:
        return invalid(observed, previous, stamp)

    config_hash = workload.config_hash(peer)
    r = Rollout.of(observed.deployment, peer.spec.replicas, config_hash)
    cert = certificate_state(peer, observed.certificate)
    served, unknown = served_steps(observed.pods)
    deg = degraded(degraded_reasons(observed, peer, r, cert, served))
    rdy = ready(deg, r, cert)
    out = BlazenPeerStatus(
        observed_generation=observed.generation,
        phase=phase(deg, rdy, r),
        replicas=r.replicas,
        updated_replicas=r.updated,
        ready_replicas=r.ready,
        selector=c.selector_string(peer),
        config_hash=config_hash,
        endpoints=endpoints(peer),
        certificate=certificate_status(peer, observed.certificate, cert[0] == "True"),
        served_steps=served,
        steps_unknown_pods=unknown,
        session_refs=session_refs_by_pod(observed.pods),
    )
    conds = {
        "Ready": rdy,
        "Available": available(peer, r),
        "Progressing": progressing(r),
        "CertificateReady": cert,
        "Degraded": deg,
    }
    if observed.ca_rotation is not None:
        conds["CARotation"] = observed.ca_rotation
    return _finish(out, conds, previous, stamp, observed.generation)


def conditions(
    types: tuple[str, ...], conds: dict[str, Cond], previous: dict[str, Any], stamp: str, generation: int
) -> list[Condition]:
    """``conds`` as status conditions in ``types`` order; a condition whose status did not move keeps its
    lastTransitionTime. Shared by every kind's status."""
    before = {x.get("type"): x for x in previous.get("conditions") or []}
    result = []
    for type_ in types:
        if type_ not in conds:
            continue
        status, reason, message = conds[type_]
        old = before.get(type_)
        unchanged = old is not None and old.get("status") == status
        since = old.get("lastTransitionTime", stamp) if old is not None and unchanged else stamp
        result.append(
            Condition(
                type=type_,
                status=status,
                reason=reason,
                message=message,
                last_transition_time=since,
                observed_generation=generation,
            )
        )
    return result


def _finish(
    out: BlazenPeerStatus,
    conds: dict[str, Cond],
    previous: dict[str, Any],
    stamp: str,
    generation: int,
) -> dict[str, Any]:
    out.conditions = conditions(CONDITION_TYPES, conds, previous, stamp, generation)
    return out.dump()


def transitions(previous: dict[str, Any] | None, current: dict[str, Any]) -> list[Transition]:
    """Events worth posting: conditions whose status moved (and the first status ever)."""
    before = {x["type"]: x for x in (previous or {}).get("conditions") or []}
    after = {x["type"]: x for x in current.get("conditions") or []}
    events: list[Transition] = []

    def moved(type_: str) -> dict[str, Any] | None:
        new = after.get(type_)
        old = before.get(type_)
        if new is None or (old is not None and old["status"] == new["status"]):
            return None
        return new

    if (d := moved("Degraded")) and d["status"] == "True":
        events.append(Transition("Warning", d["reason"], d["message"] or d["reason"]))
    elif d and d["status"] == "False" and "Degraded" in before:
        events.append(Transition("Normal", "Recovered", "no longer degraded"))
    if (cr := moved("CertificateReady")) and cr["reason"] != "TLSDisabled":
        kind = "Normal" if cr["status"] == "True" else "Warning"
        if cr["status"] == "True" or "CertificateReady" in before:
            events.append(Transition(kind, cr["reason"], cr["message"] or cr["reason"]))
    if (r := moved("Ready")) and r["status"] == "True":
        events.append(Transition("Normal", "Ready", r["message"]))
    elif r and "Ready" in before and r["reason"] != (d or {}).get("reason"):
        events.append(Transition("Warning", "NotReady", r["message"] or r["reason"]))
    return events
