"""Status as a pure function of the observed objects.

``compute`` takes the BlazenPeer's generation and spec, the Deployment, the serving Certificate, what the
ready pods report on ``/v1/info`` and the previous status, and returns the new status (wire form). Nothing
here talks to the API; ``transitions`` says which Events a status change deserves.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from .builders import Peer
from .builders import common as c
from .spec import BlazenPeerStatus, CertificateStatus, Condition, Endpoints

CONDITION_TYPES = ("Ready", "Available", "Progressing", "CertificateReady", "Degraded")


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


def certificate_state(peer: Peer, cert: dict[str, Any] | None) -> tuple[str, str, str]:
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
    out = BlazenPeerStatus(observed_generation=observed.generation)
    conds: dict[str, tuple[str, str, str]] = {}

    if peer is None:
        msg = observed.invalid or "invalid spec"
        out.phase = "Invalid"
        conds["Ready"] = ("False", "InvalidSpec", msg)
        conds["Degraded"] = ("True", "InvalidSpec", msg)
        # keep what we knew of the running children; the old pods keep serving
        keys = ("replicas", "readyReplicas", "selector", "endpoints", "certificate")
        kept = {k: previous[k] for k in keys if k in previous}
        out = BlazenPeerStatus.model_validate(
            {**kept, "observedGeneration": observed.generation, "phase": "Invalid"}
        )
        return _finish(out, conds, previous, stamp, observed.generation)

    sp = peer.spec
    desired = sp.replicas
    dep = observed.deployment
    dstatus = (dep or {}).get("status") or {}
    replicas = int(dstatus.get("replicas") or 0)
    ready = int(dstatus.get("readyReplicas") or 0)
    updated = int(dstatus.get("updatedReplicas") or 0)
    available = int(dstatus.get("availableReplicas") or 0)
    out.replicas = replicas
    out.ready_replicas = ready
    out.updated_replicas = updated
    out.selector = c.selector_string(peer)

    from .builders import workload  # local: keep the import graph one-way

    out.config_hash = workload.config_hash(peer)
    scheme = "https" if sp.tls.enabled else "http"
    out.endpoints = Endpoints(grpc=f"{c.svc_host(peer)}:{sp.ports.grpc}", headless=c.headless_host(peer))
    if sp.http.enabled:
        out.endpoints.http = f"{scheme}://{c.svc_host(peer)}:{sp.ports.http}"
    if sp.plaintext_grpc.enabled:
        out.endpoints.plaintext_grpc = f"{c.svc_host(peer)}:{sp.ports.plaintext_grpc}"

    # certificate
    cert_status, cert_reason, cert_msg = certificate_state(peer, observed.certificate)
    conds["CertificateReady"] = (cert_status, cert_reason, cert_msg)
    if sp.tls.enabled:
        cstat = (observed.certificate or {}).get("status") or {}
        cert: dict[str, Any] = {
            "name": c.server_cert_name(peer),
            "secretName": c.server_cert_name(peer),
            "clientSecretName": c.client_cert_name(peer),
            "ready": cert_status == "True",
        }
        if cstat.get("notAfter"):
            cert["notAfter"] = cstat["notAfter"]
        if cstat.get("renewalTime"):
            cert["renewalTime"] = cstat["renewalTime"]
        out.certificate = CertificateStatus.model_validate(cert)

    # steps actually served, as the ready pods report them
    ready_pods = [p for p in observed.pods if p.ready]
    reported = [p for p in ready_pods if p.info is not None and isinstance(p.info.get("steps"), list)]
    if reported:
        out.served_steps = sorted({str(s) for p in reported for s in p.info["steps"]})
    out.steps_unknown_pods = len(ready_pods) - len(reported) if ready_pods else None
    refs = {p.name: r for p in ready_pods if (r := session_refs(p.info)) is not None}
    out.session_refs = refs or None

    # deployment
    dep_gen_ok = dep is not None and (dstatus.get("observedGeneration") or 0) >= (
        (dep.get("metadata") or {}).get("generation") or 0
    )
    dep_progress = _cond(dep, "Progressing")
    dep_available = _cond(dep, "Available")
    dep_failure = _cond(dep, "ReplicaFailure")
    deadline = dep_progress is not None and dep_progress.get("reason") == "ProgressDeadlineExceeded"
    # The Deployment must carry this spec (not a stale read or someone else's template), the controller must
    # have seen it, and every pod must be new and ready: Ready means the current spec serves.
    template_current = (
        ((((dep or {}).get("spec") or {}).get("template") or {}).get("metadata") or {}).get("annotations")
        or {}
    ).get(c.CONFIG_HASH_ANNOTATION) == out.config_hash
    rolled_out = (
        template_current and dep_gen_ok and updated == desired and replicas == desired and ready == desired
    )

    if dep is None:
        msg = f"Deployment {c.deployment_name(peer)} not created yet"
        conds["Available"] = ("False", "DeploymentMissing", msg)
    elif desired == 0:
        conds["Available"] = ("True", "ScaledToZero", "spec.replicas is 0")
    elif dep_available is not None and dep_available.get("status") == "True" and available > 0:
        if rolled_out:
            conds["Available"] = ("True", "MinimumReplicasAvailable", f"{available}/{desired} pods available")
        else:  # callers are served, but not by pods of the current spec (yet)
            msg = f"{available} pods available, {updated}/{desired} on the current template"
            conds["Available"] = ("True", "PreviousPodsServing", msg)
    else:
        conds["Available"] = ("False", "MinimumReplicasUnavailable", f"{available}/{desired} pods available")

    if dep is None:
        conds["Progressing"] = ("True", "Creating", "creating the peer Deployment")
    elif deadline:
        conds["Progressing"] = ("False", "ProgressDeadlineExceeded", dep_progress.get("message") or "")
    elif not rolled_out:
        conds["Progressing"] = (
            "True",
            "RollingOut",
            f"{updated}/{desired} pods updated, {ready}/{desired} ready, {replicas} total",
        )
    else:
        conds["Progressing"] = ("False", "RolloutComplete", f"{desired} pods on the current template")

    degraded: list[tuple[str, str]] = []
    if observed.conflict:
        degraded.append(("ChildNotOwned", observed.conflict))
    if observed.apply_error:
        degraded.append(("ApplyFailed", observed.apply_error))
    if observed.token_missing:
        degraded.append(("TokenSecretMissing", observed.token_missing))
    if deadline:
        degraded.append(("ProgressDeadlineExceeded", dep_progress.get("message") or ""))
    if dep_failure is not None and dep_failure.get("status") == "True":
        degraded.append(("ReplicaFailure", dep_failure.get("message") or ""))
    if cert_status == "False" and cert_reason in CERT_FAILURES:
        degraded.append((cert_reason, cert_msg))
    if sp.steps is not None and out.served_steps is not None:
        missing = sorted(set(sp.steps) - set(out.served_steps))
        if missing:
            msg = f"spec.steps not served by the ready pods: {', '.join(missing)}"
            degraded.append(("StepsNotServed", msg))
    if degraded:
        msg = "; ".join(m for _, m in degraded if m) or degraded[0][0]
        conds["Degraded"] = ("True", degraded[0][0], msg)
    else:
        conds["Degraded"] = ("False", "AsExpected", "")

    # Ready: everything rolled out, certificates issued, nothing degraded
    if degraded:
        conds["Ready"] = ("False", degraded[0][0], conds["Degraded"][2])
    elif dep is None:
        conds["Ready"] = ("False", "DeploymentMissing", "the peer Deployment does not exist yet")
    elif cert_status != "True":
        conds["Ready"] = ("False", "CertificateNotReady", cert_msg)
    elif not rolled_out:
        conds["Ready"] = ("False", "PodsNotReady", f"{ready}/{desired} pods ready on the current template")
    elif desired == 0:
        conds["Ready"] = ("True", "ScaledToZero", "spec.replicas is 0")
    else:
        conds["Ready"] = ("True", "AllPodsReady", f"{ready}/{desired} pods ready")

    if degraded:
        out.phase = "Degraded"
    elif conds["Ready"][0] == "True":
        out.phase = "Ready"
    elif dep is None:
        out.phase = "Pending"
    else:
        out.phase = "Progressing"
    return _finish(out, conds, previous, stamp, observed.generation)


def _finish(
    out: BlazenPeerStatus,
    conds: dict[str, tuple[str, str, str]],
    previous: dict[str, Any],
    stamp: str,
    generation: int,
) -> dict[str, Any]:
    before = {x.get("type"): x for x in previous.get("conditions") or []}
    result = []
    for type_ in CONDITION_TYPES:
        if type_ not in conds:
            continue
        status, reason, message = conds[type_]
        old = before.get(type_)
        moved = old is None or old.get("status") != status
        result.append(
            Condition(
                type=type_,
                status=status,
                reason=reason,
                message=message,
                last_transition_time=stamp if moved else old.get("lastTransitionTime", stamp),
                observed_generation=generation,
            )
        )
    out.conditions = result
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
