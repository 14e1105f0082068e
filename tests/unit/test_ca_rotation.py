"""The namespace CA rotation state machine (operator/blazen_operator/rotation.py), driven phase by phase with
real certificates, and the runtime's /v1/info trust report it reads (pki.tls.trust_report)."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace

import pytest
from blazen_operator import rotation as r
from blazen_peer.pki.tls import cert_fingerprint, trust_report, validate_tls_material

from tests.support.pki import CA

NOW = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
WINDOW = dt.timedelta(days=30)


@pytest.fixture(scope="module")
def old() -> CA:
    return CA(name="blazen-ca.ns")


@pytest.fixture(scope="module")
def new() -> CA:
    return CA(name="blazen-ca-2.ns")


def pem(ca: CA) -> str:
    return ca.cert_pem.decode()


def fp(ca: CA) -> str:
    return r.fingerprint(pem(ca))


def world(cas, pods=(), leaves=(), request=None, now=NOW) -> r.World:
    return r.World(
        now=now, renew_before=WINDOW, request=request, cas=cas, pods=tuple(pods), leaves=tuple(leaves)
    )


def far(ca: CA) -> r.CaCert:
    return r.CaCert(pem(ca), NOW + dt.timedelta(days=300))


def pod(name: str, trusted: set[str] | None, leaf: str | None = None, peer: str = "a") -> r.PodTrust:
    return r.PodTrust(peer, name, frozenset(trusted) if trusted is not None else None, leaf)


def test_fingerprint_is_what_the_runtime_reports(old):
    assert fp(old) == cert_fingerprint(old.cert)
    bundle = pem(old) + "\n\n" + pem(CA())
    assert r.split_pem(bundle)[0] == pem(old).strip() + "\n"
    assert len(r.split_pem(bundle)) == 2


def test_idle_bootstraps_the_bundle_and_stays(old):
    waiting = r.step(r.Stored(), world({1: r.CaCert(None)}))
    assert waiting.stored == r.Stored()
    assert "waiting for cert-manager" in waiting.progress
    first = r.step(r.Stored(), world({1: far(old)}))
    assert first.stored.roots == (pem(old),)
    assert first.stored.phase == "Idle"
    again = r.step(first.stored, world({1: far(old)}))
    assert again.stored == first.stored
    # the progress is every BlazenPeer's CARotation condition: the same from the first idle pass on, or each
    # idle namespace costs a status write per BlazenPeer
    assert first.progress == again.progress == f"CA {fp(old)[:16]} in use"
    assert not again.events
    assert not again.reissue


def test_a_forced_rotation_goes_through_every_phase(old, new):
    idle = r.Stored(roots=(pem(old),))
    # Idle -> Issuing on a new blazen.dev/rotate-ca value; the old CA keeps signing
    p = r.step(idle, world({1: far(old)}, request="2026-12-01"))
    s = p.stored
    assert (s.phase, s.generation, s.target, s.reason, s.handled) == ("Issuing", 1, 2, "Forced", "2026-12-01")
    assert s.roots == (pem(old),)
    assert [e[1] for e in p.events] == ["CaRotationStarted"]
    # Issuing waits for cert-manager, then the bundle holds old + new
    assert r.step(s, world({1: far(old), 2: r.CaCert(None)}, request="2026-12-01")).stored == s
    p = r.step(s, world({1: far(old), 2: far(new)}, request="2026-12-01"))
    s = p.stored
    assert s.phase == "Trusting"
    assert s.roots == (pem(old), pem(new))
    assert s.generation == 1
    assert [e[1] for e in p.events] == ["CaIssued"]
    cas = {1: far(old), 2: far(new)}
    both = {fp(old), fp(new)}
    # Trusting: a pod that trusts only the old root, or did not answer, holds the phase
    p = r.step(s, world(cas, [pod("a-1", both, fp(old)), pod("a-2", {fp(old)}, fp(old)), pod("a-3", None)]))
    assert p.stored == s
    assert p.waiting == {"a": ["a-2", "a-3"]}
    assert "1/3 pods" in p.progress
    leaves = [
        r.Leaf("a-tls", pem(old)),
        r.Leaf("a-client-tls", pem(old)),
        r.Leaf("b-tls", pem(old), issuing=True),
    ]
    pods = [pod("a-1", both, fp(old)), pod("a-2", both, fp(old))]
    p = r.step(s, world(cas, pods, leaves))
    s = p.stored
    assert (s.phase, s.generation) == ("Reissuing", 2), "the Issuer signs with the new CA from now on"
    assert p.reissue == ("a-tls", "a-client-tls"), "server and client leaves; one already issuing is left be"
    assert s.roots == (pem(old), pem(new))
    # Reissuing: the old root stays while any leaf or pod is still on the old CA
    leaves = [r.Leaf("a-tls", pem(new)), r.Leaf("a-client-tls", pem(old)), r.Leaf("b-tls", pem(new))]
    p = r.step(s, world(cas, [pod("a-1", both, fp(new)), pod("a-2", both, fp(new))], leaves))
    assert p.stored == s
    assert p.reissue == ("a-client-tls",), "a leaf cert-manager finished on the old CA again"
    leaves = [r.Leaf(n, pem(new)) for n in ("a-tls", "a-client-tls", "b-tls")]
    p = r.step(s, world(cas, [pod("a-1", both, fp(new)), pod("a-2", both, fp(old))], leaves))
    assert p.stored == s
    assert p.waiting == {"a": ["a-2"]}
    assert "1/2 pods" in p.progress
    p = r.step(s, world(cas, [pod("a-1", both, fp(new)), pod("a-2", both, fp(new))], leaves))
    s = p.stored
    assert s.phase == "Dropping"
    assert s.roots == (pem(new),), "the old root leaves the bundle only now"
    assert [e[1] for e in p.events] == ["LeavesReissued"]
    # Dropping: done when no pod trusts the old root any more; then the old CA is deleted
    p = r.step(s, world(cas, [pod("a-1", {fp(new)}, fp(new)), pod("a-2", both, fp(new))], leaves))
    assert p.stored == s
    assert not p.delete_generations
    p = r.step(s, world(cas, [pod("a-1", {fp(new)}, fp(new)), pod("a-2", {fp(new)}, fp(new))], leaves))
    s = p.stored
    assert (s.phase, s.generation, s.target, s.roots) == ("Idle", 2, None, (pem(new),))
    assert p.delete_generations == (1,)
    assert [e[1] for e in p.events] == ["CaRotationComplete"]
    assert p.progress == r.step(s, world({2: far(new)})).progress, "the idle condition stays as it is"
    # the same request value does not rotate again; a new one does
    assert r.step(s, world({2: far(new)}, request="2026-12-01")).stored.phase == "Idle"
    assert r.step(s, world({2: far(new)}, request="again")).stored.target == 3


def test_the_renewal_window_starts_a_rotation(old):
    idle = r.Stored(roots=(pem(old),))
    later = r.CaCert(pem(old), NOW + WINDOW + dt.timedelta(seconds=1))
    assert r.step(idle, world({1: later})).stored.phase == "Idle"
    due = r.CaCert(pem(old), NOW + WINDOW)
    p = r.step(idle, world({1: due}))
    assert (p.stored.phase, p.stored.reason, p.stored.target) == ("Issuing", "Renewal", 2)


def test_a_ca_changed_in_place_is_trusted_next_to_the_old_one(old, new):
    """cert-manager renewed the issuing CA under its own name (the backstop, or a user issuer): the bundle
    keeps the old root next to the new one until every leaf moved."""
    idle = r.Stored(roots=(pem(old),))
    p = r.step(idle, world({1: far(new)}))
    assert (p.stored.phase, p.stored.target, p.stored.reason) == ("Trusting", 1, "CaChanged")
    assert p.stored.roots == (pem(old), pem(new))
    assert p.events[0][0] == "Warning"


def test_restart_mid_rotation_resumes_from_the_stored_state(old, new):
    """An operator restarted between any two passes rebuilds its state from the ConfigMap (annotation and
    ca.crt) and takes the same decision."""
    cas = {1: far(old), 2: far(new)}
    both = {fp(old), fp(new)}
    leaves = [r.Leaf("a-tls", pem(old))]
    s = r.Stored(
        generation=1, phase="Trusting", target=2, roots=(pem(old), pem(new)), reason="Forced", since="x"
    )
    loaded = r.Stored.load(s.annotation(), r.join_pem(s.roots))
    assert loaded == s
    p = r.step(loaded, world(cas, [pod("a-1", both, fp(old))], leaves))
    assert p.stored.phase == "Reissuing"
    assert p.reissue == ("a-tls",)
    # crash after storing Reissuing, before the leaves were marked: the next pass marks them again
    resumed = r.Stored.load(p.stored.annotation(), r.join_pem(p.stored.roots))
    again = r.step(resumed, world(cas, [pod("a-1", both, fp(old))], leaves))
    assert again.stored == resumed
    assert again.reissue == ("a-tls",)
    # crash after storing Idle, before the old CA was deleted: Idle deletes the stale generation
    done = r.Stored(generation=2, roots=(pem(new),))
    assert r.step(done, world(cas)).delete_generations == (1,)


def test_unreadable_state_is_a_fresh_idle_state_over_the_bundle(old):
    assert r.Stored.load("{not json", pem(old)) == r.Stored(roots=(pem(old),))
    assert r.Stored.load('{"phase": "Bogus"}', "") == r.Stored()


def test_a_new_ca_deleted_mid_rotation_is_issued_again(old, new):
    s = r.Stored(generation=1, phase="Trusting", target=2, roots=(pem(old), pem(new)))
    p = r.step(s, world({1: far(old)}))
    assert p.stored.phase == "Issuing"
    assert p.stored.roots == (pem(old), pem(new))


def test_no_pods_do_not_block(old, new):
    s = r.Stored(generation=1, phase="Trusting", target=2, roots=(pem(old), pem(new)))
    assert r.step(s, world({1: far(old), 2: far(new)})).stored.phase == "Reissuing"


def test_runtime_trust_report_names_every_root_and_the_leaf_root(old, new):
    leaf = new.issue("peer")
    bundle = old.cert_pem + new.cert_pem
    material = validate_tls_material(
        cert_pem=leaf.cert_pem, key_pem=leaf.key_pem, ca_pem=bundle, role="server"
    )
    report = trust_report(material)
    assert report["trusted_sha256"] == [fp(old), fp(new)]
    assert report["leaf_root_sha256"] == fp(new)
    assert report["leaf_sha256"] == material.fingerprint


def test_callers_get_a_settle_time_in_trusting_and_reissuing(old, new):
    """Callers outside the peers' pods cannot report what they trust: the phases that change what they must
    trust or present last at least ``settle`` even when every pod is there already."""
    cas = {1: far(old), 2: far(new)}
    both = {fp(old), fp(new)}
    settle = dt.timedelta(seconds=120)
    s = r.Stored(phase="Trusting", target=2, roots=(pem(old), pem(new)), since="2026-12-01T00:00:00Z")
    early = r.World(
        NOW + dt.timedelta(seconds=60), WINDOW, None, cas, (pod("a-1", both, fp(old)),), settle=settle
    )
    p = r.step(s, early)
    assert p.stored == s
    assert "60s more for callers" in p.progress
    late = replace(early, now=NOW + dt.timedelta(seconds=121))
    p = r.step(s, late)
    assert p.stored.phase == "Reissuing"
    leaves = (r.Leaf("a-tls", pem(new)),)
    s = replace(p.stored, since="2026-12-01T00:03:00Z")
    moved = (pod("a-1", both, fp(new)),)
    assert (
        r.step(s, r.World(NOW + dt.timedelta(seconds=200), WINDOW, None, cas, moved, leaves, settle)).stored
        == s
    )
    after = r.World(NOW + dt.timedelta(seconds=301), WINDOW, None, cas, moved, leaves, settle)
    assert r.step(s, after).stored.phase == "Dropping"


def test_a_leaf_on_a_ca_the_bundle_lacks_starts_the_overlap(old, new):
    """A user issuer's CA change shows in its leaves: the newest leaf's CA is the issuing one, and leaves
    still on another CA keep it in the bundle (also on the first pass, before any bundle existed)."""
    first = r.step(r.Stored(), world({1: r.CaCert(pem(new))}, leaves=[r.Leaf("a-tls", pem(old))]))
    s = first.stored
    assert (s.phase, s.reason, s.roots) == ("Trusting", "CaChanged", (pem(old), pem(new)))
    idle = r.Stored(roots=(pem(old),))
    p = r.step(idle, world({1: r.CaCert(pem(new))}, leaves=[r.Leaf("a-tls", pem(new))]))
    assert (p.stored.phase, p.stored.roots) == ("Trusting", (pem(old), pem(new)))
    assert [e[1] for e in p.events] == ["CaChanged"]
    settled = r.Stored(roots=(pem(new),))
    assert (
        r.step(settled, world({1: r.CaCert(pem(new))}, leaves=[r.Leaf("a-tls", pem(new))])).stored == settled
    )


def test_a_ca_that_changes_again_mid_rotation_joins_the_bundle(old, new):
    """No leaf can move to a root the bundle lacks: a third CA seen during Reissuing or Dropping goes into the
    bundle and the rotation goes back to Trusting, instead of waiting forever for pods to serve it."""
    third = CA(name="corp-third")
    for phase, roots in (("Reissuing", (pem(old), pem(new))), ("Dropping", (pem(new),))):
        s = r.Stored(phase=phase, target=1, roots=roots, reason="CaChanged", since="2026-12-01T00:00:00Z")
        p = r.step(s, world({1: r.CaCert(pem(third))}))
        assert (p.stored.phase, p.stored.roots) == ("Trusting", (*roots, pem(third)))
        assert [e[1] for e in p.events] == ["CaChanged"]
