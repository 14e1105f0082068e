"""Rotation of a trust bundle's CA as a small state machine over what is stored in the API. Pure: no I/O.

The same machine serves the namespace CA the operator issues and a user issuer's CA (``tls.issuerRef``),
whose change is only observed: for a user issuer ``World.cas`` holds one generation, the CA of its newest
leaf, and ``World.leaves`` is given in Idle too, so a new CA shows as CaChanged; Issuing never happens.

The trust bundle (the ConfigMap ``blazen-trust``, key ``ca.crt``, which every pod mounts as its CA file) and
the state below (an annotation of the same ConfigMap) are the whole memory of a rotation, so an operator
restarted mid-rotation resumes from them. :func:`step` takes what is stored and what is observed now and
returns what to store, what to ask of cert-manager and which Events to post. Phases:

``Idle``       the bundle holds the issuing CA. A rotation starts when ``blazen.dev/rotate-ca`` carries a
               value not acted on yet (Forced), when the issuing CA is within ``tls.ca.renewBefore`` of its
               expiry (Renewal), or when the issuing CA's certificate changed under us or a leaf is signed by
               a CA the bundle lacks (CaChanged: the namespace CA renewed in place, a user issuer's new CA;
               the bundle gets the new one next to the old ones and the rotation goes on at Trusting).
``Issuing``    cert-manager issues the next CA under a new name (``blazen-ca-<n>``); the CA Issuer keeps
               signing with the old one.
``Trusting``   the bundle holds old + new; waits until every pod reports trusting every root of the bundle.
``Reissuing``  the CA Issuer signs with the new CA; every leaf Certificate of the namespace (servers, callers)
               is re-issued through cert-manager's Issuing condition (what ``cmctl renew`` sets); waits until
               every leaf Secret carries the new CA and every pod serves a leaf of the new CA.
               Trusting and Reissuing also last at least ``settle``: callers outside the peers' pods
               (a client mounting the bundle and its client Secret) cannot be asked, only given time.
``Dropping``   the bundle holds the new CA only; waits until no pod trusts an old root, then deletes the old
               CA Certificate and Secret and returns to Idle.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Literal

Phase = Literal["Idle", "Issuing", "Trusting", "Reissuing", "Dropping"]
PHASES: tuple[Phase, ...] = ("Idle", "Issuing", "Trusting", "Reissuing", "Dropping")

_PEM_BEGIN = "-----BEGIN CERTIFICATE-----"
_PEM_END = "-----END CERTIFICATE-----"


def split_pem(bundle: str) -> tuple[str, ...]:
    """The certificates of a PEM bundle, each normalised to ``BEGIN..END\\n``."""
    out: list[str] = []
    rest = bundle
    while (start := rest.find(_PEM_BEGIN)) >= 0:
        end = rest.find(_PEM_END, start)
        if end < 0:
            break
        end += len(_PEM_END)
        out.append(rest[start:end].strip() + "\n")
        rest = rest[end:]
    return tuple(out)


def fingerprint(pem: str) -> str:
    """Hex SHA-256 of the certificate's DER, as the runtime reports it on /v1/info."""
    body = pem.strip().removeprefix(_PEM_BEGIN).removesuffix(_PEM_END)
    return hashlib.sha256(base64.b64decode("".join(body.split()))).hexdigest()


def join_pem(roots: tuple[str, ...]) -> str:
    return "".join(roots)


@dataclass(frozen=True)
class Stored:
    """The rotation state kept in the trust ConfigMap (``roots`` is its ``ca.crt``)."""

    generation: int = 1  # the CA the Issuer signs with
    phase: Phase = "Idle"
    target: int | None = None  # the CA being rolled in
    roots: tuple[str, ...] = ()
    handled: str | None = None  # the last blazen.dev/rotate-ca value acted on
    reason: str = ""
    since: str | None = None  # when the phase began (RFC 3339)

    def annotation(self) -> str:
        return json.dumps(
            {
                "generation": self.generation,
                "phase": self.phase,
                "target": self.target,
                "handled": self.handled,
                "reason": self.reason,
                "since": self.since,
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    @classmethod
    def load(cls, annotation: str | None, bundle: str | None) -> Stored:
        """The stored state; an absent or unreadable annotation is a fresh Idle state over the bundle."""
        roots = split_pem(bundle or "")
        try:
            raw = json.loads(annotation or "{}")
            phase = raw.get("phase", "Idle")
            if phase not in PHASES:
                raise ValueError(phase)
            target = raw.get("target")
            return cls(
                generation=max(1, int(raw.get("generation", 1))),
                phase=phase,
                target=int(target) if target is not None else None,
                roots=roots,
                handled=raw.get("handled"),
                reason=str(raw.get("reason") or ""),
                since=raw.get("since"),
            )
        except (ValueError, TypeError, AttributeError):
            return cls(roots=roots)


@dataclass(frozen=True)
class CaCert:
    """One CA generation as observed: its certificate (None until cert-manager issued it) and expiry."""

    pem: str | None
    not_after: dt.datetime | None = None


@dataclass(frozen=True)
class PodTrust:
    """What one ready pod reported on /v1/info (``trusted`` None: it did not answer or reports no TLS)."""

    peer: str
    pod: str
    trusted: frozenset[str] | None
    leaf_root: str | None = None


@dataclass(frozen=True)
class Leaf:
    """One leaf Certificate signed by the namespace CA Issuer: the ca.crt of its Secret (the CA that signed
    the current leaf) and whether cert-manager is issuing it now."""

    name: str
    ca_pem: str | None
    issuing: bool = False


@dataclass(frozen=True)
class World:
    now: dt.datetime
    renew_before: dt.timedelta
    request: str | None  # the blazen.dev/rotate-ca annotation
    cas: dict[int, CaCert]  # by generation: every CA Certificate that exists
    pods: tuple[PodTrust, ...] = ()
    leaves: tuple[Leaf, ...] = ()
    # Callers outside the peers' pods (a client mounting the bundle and its client Secret) cannot be asked
    # what they trust: Trusting and Reissuing last at least this long, so their kubelet syncs their volumes.
    settle: dt.timedelta = dt.timedelta(0)
    # False for a user issuer: one observed CA, no generations of ours; messages name the CA by fingerprint.
    generations: bool = True


@dataclass(frozen=True)
class Plan:
    stored: Stored
    reissue: tuple[str, ...] = ()  # leaf Certificates to mark Issuing
    delete_generations: tuple[int, ...] = ()
    events: tuple[tuple[str, str, str], ...] = ()  # (type, reason, message)
    progress: str = ""
    waiting: dict[str, list[str]] = field(default_factory=dict)  # peer -> pods the phase waits for


def _stamp(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def _short(pem: str) -> str:
    return fingerprint(pem)[:16]


def _in_use(pem: str) -> str:
    # The Idle progress: the BlazenPeers' CARotation condition, so it must not change from one idle pass to
    # the next (each change is a status write per BlazenPeer).
    return f"CA {_short(pem)} in use"


def _ca(world: World, target: int, pem: str) -> str:
    return f"CA generation {target} ({_short(pem)})" if world.generations else f"CA {_short(pem)}"


def _with(roots: tuple[str, ...], pem: str) -> tuple[str, ...]:
    return roots if pem in roots else (*roots, pem)


def _waiting(pods: tuple[PodTrust, ...], done: list[bool]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for pod, ok in zip(pods, done, strict=True):
        if not ok:
            out.setdefault(pod.peer, []).append(pod.pod)
    return out


def _settling(stored: Stored, world: World) -> float:
    """Seconds the phase must still last for the callers (0: it may end)."""
    since = _parse_stamp(stored.since)
    if since is None:
        return 0.0
    return max(0.0, (since + world.settle - world.now).total_seconds())


def _parse_stamp(value: str | None) -> dt.datetime | None:
    try:
        return dt.datetime.strptime(value or "", "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    except ValueError:
        return None


def _enter(stored: Stored, now: dt.datetime, **changes: object) -> Stored:
    return replace(stored, since=_stamp(now), **changes)  # type: ignore[arg-type]


def step(stored: Stored, world: World) -> Plan:
    """One transition (at most) from ``stored`` given ``world``."""
    now = world.now
    current = world.cas.get(stored.generation)
    cur_pem = current.pem if current is not None else None

    if stored.phase == "Idle":
        stale = tuple(g for g in sorted(world.cas) if g != stored.generation)
        if cur_pem is None:
            return Plan(stored, delete_generations=stale, progress="waiting for cert-manager to issue the CA")
        # Leaves signed by a CA the bundle lacks (a user issuer's leaves are observed in Idle too: their
        # ca.crt is how its CA change shows) join the bundle next to the issuing CA.
        behind = tuple(
            dict.fromkeys(
                leaf.ca_pem
                for leaf in world.leaves
                if leaf.ca_pem and leaf.ca_pem not in (cur_pem, *stored.roots)
            )
        )
        if not stored.roots and not behind:
            return Plan(
                replace(stored, roots=(cur_pem,)), delete_generations=stale, progress=_in_use(cur_pem)
            )
        if cur_pem not in stored.roots or behind:
            # The issuing CA changed under us (cert-manager renewed it in place, a user issuer got a new
            # CA): trust old and new, re-issue.
            new = _enter(stored, now, phase="Trusting", target=stored.generation, reason="CaChanged")
            new = replace(new, roots=_with((*stored.roots, *behind), cur_pem))
            msg = f"the CA changed (now {_short(cur_pem)}): trusting old and new roots"
            return Plan(new, events=(("Warning", "CaChanged", msg),), progress=msg)
        forced = world.request is not None and world.request != stored.handled
        expiry = current.not_after if current is not None else None
        due = expiry is not None and now >= expiry - world.renew_before
        if forced or due:
            reason = "Forced" if forced else "Renewal"
            target = max([stored.generation, *world.cas]) + 1
            new = _enter(stored, now, phase="Issuing", target=target, reason=reason, handled=world.request)
            msg = f"{reason}: issuing CA generation {target}; generation {stored.generation} keeps signing"
            return Plan(new, events=(("Normal", "CaRotationStarted", msg),), progress=msg)
        return Plan(stored, delete_generations=stale, progress=_in_use(cur_pem))

    target = stored.target if stored.target is not None else stored.generation
    new_ca = world.cas.get(target)
    new_pem = new_ca.pem if new_ca is not None else None

    if stored.phase == "Issuing":
        if new_pem is None:
            return Plan(stored, progress=f"waiting for cert-manager to issue CA generation {target}")
        new = _enter(stored, now, phase="Trusting", roots=_with(stored.roots, new_pem))
        msg = f"CA generation {target} ({_short(new_pem)}) issued; the trust bundle holds old and new roots"
        return Plan(new, events=(("Normal", "CaIssued", msg),), progress=msg)

    if new_pem is None:  # the new CA vanished mid-rotation (deleted by hand): issue it again
        return Plan(_enter(stored, now, phase="Issuing"), progress=f"CA generation {target} is missing")
    if new_pem not in stored.roots:
        # The CA being rolled in changed again (renewed in place, a user issuer's CA replaced once more): no
        # leaf can move to a root the bundle lacks, so trust it too and start over from Trusting.
        new = _enter(stored, now, phase="Trusting", reason="CaChanged", roots=_with(stored.roots, new_pem))
        msg = f"the CA changed again during the rotation (now {_short(new_pem)}): trusting it too"
        return Plan(new, events=(("Warning", "CaChanged", msg),), progress=msg)

    pods = world.pods
    if stored.phase == "Trusting":
        need = {fingerprint(p) for p in stored.roots}
        done = [p.trusted is not None and need <= p.trusted for p in pods]
        if not all(done):
            msg = f"{sum(done)}/{len(pods)} pods trust every root of the bundle"
            return Plan(stored, progress=msg, waiting=_waiting(pods, done))
        if (left := _settling(stored, world)) > 0:
            msg = f"every pod trusts both roots; {left:.0f}s more for callers to get the bundle"
            return Plan(stored, progress=msg)
        new = _enter(stored, now, phase="Reissuing", generation=target)
        reissue = tuple(leaf.name for leaf in world.leaves if leaf.ca_pem != new_pem and not leaf.issuing)
        msg = (
            f"every pod trusts both roots; re-issuing {len(reissue)} leaf certificates with "
            f"{_ca(world, target, new_pem)}"
        )
        return Plan(new, reissue=reissue, events=(("Normal", "ReissuingLeaves", msg),), progress=msg)

    new_fp = fingerprint(new_pem)
    if stored.phase == "Reissuing":
        stale_leaves = [leaf for leaf in world.leaves if leaf.ca_pem != new_pem]
        retry = tuple(leaf.name for leaf in stale_leaves if not leaf.issuing)
        done = [p.leaf_root == new_fp for p in pods]
        if stale_leaves or not all(done):
            msg = (
                f"{len(world.leaves) - len(stale_leaves)}/{len(world.leaves)} leaf certificates and "
                f"{sum(done)}/{len(pods)} pods on {_ca(world, target, new_pem)}"
            )
            return Plan(stored, reissue=retry, progress=msg, waiting=_waiting(pods, done))
        if (left := _settling(stored, world)) > 0:
            msg = f"every leaf and pod on the new CA; {left:.0f}s more for callers to reload their leaves"
            return Plan(stored, progress=msg)
        new = _enter(stored, now, phase="Dropping", roots=(new_pem,))
        msg = f"every leaf is issued by {_ca(world, target, new_pem)}; dropping the old roots from the bundle"
        return Plan(new, events=(("Normal", "LeavesReissued", msg),), progress=msg)

    # Dropping
    done = [p.trusted is not None and p.trusted == {new_fp} for p in pods]
    if not all(done):
        msg = f"{sum(done)}/{len(pods)} pods trust only the new root"
        return Plan(stored, progress=msg, waiting=_waiting(pods, done))
    new = _enter(stored, now, phase="Idle", target=None, roots=(new_pem,))
    old = tuple(g for g in sorted(world.cas) if g != target)
    msg = f"CA rotation complete: {_ca(world, target, new_pem)} is the only trusted root"
    return Plan(
        new,
        delete_generations=old,
        events=(("Normal", "CaRotationComplete", msg),),
        progress=_in_use(new_pem),
    )
