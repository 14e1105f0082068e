"""The protocol's names and numbers, in one place: the gRPC service and its method paths, the HTTP/JSON
shim's routes, the metadata/header names, the envelope version and the message limit
(docs/wire.md, /work/shared/docs/blazen-wire-protocol.md). Server, client, admission and metrics all read
them from here."""

from __future__ import annotations

#: the envelope version this runtime speaks (requests and answers carry it; newer ones are refused).
ENVELOPE_VERSION = 1
#: tonic's default decode limit, applied to the protobuf message.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024

SERVICE = "blazen.peer.v1.BlazenPeer"
METHOD_INVOKE = "InvokeSubWorkflow"
METHOD_STREAM = "StreamSubWorkflowEvents"
METHOD_DEREF = "DerefSessionRef"
METHOD_RELEASE = "ReleaseSessionRef"
#: full gRPC method paths, as grpcio hands them to a handler.
PATH_INVOKE = f"/{SERVICE}/{METHOD_INVOKE}"
PATH_STREAM = f"/{SERVICE}/{METHOD_STREAM}"
PATH_DEREF = f"/{SERVICE}/{METHOD_DEREF}"
PATH_RELEASE = f"/{SERVICE}/{METHOD_RELEASE}"

#: our own internal service, on the same authenticated gRPC port: a router asks each peer what it serves
#: (docs/router.md). Blazen's clients never see it.
FLEET_SERVICE = "blazen.fleet.v1.Fleet"
METHOD_DESCRIBE = "Describe"
PATH_DESCRIBE = f"/{FLEET_SERVICE}/{METHOD_DESCRIBE}"
#: a router running a sub-workflow split over pools runs each step with ``RunStep`` on a replica that serves
#: it, then ends the run with ``EndRun`` on every replica that ran one (docs/router.md). Only the router's
#: identity may call them (``--fleet-router-identity``, ``--fleet-router-token-file``).
METHOD_RUN_STEP = "RunStep"
PATH_RUN_STEP = f"/{FLEET_SERVICE}/{METHOD_RUN_STEP}"
METHOD_END_RUN = "EndRun"
PATH_END_RUN = f"/{FLEET_SERVICE}/{METHOD_END_RUN}"
#: the metadata key carrying the router token (``--fleet-router-token-file``) on RunStep / EndRun.
FLEET_ROUTER_TOKEN_METADATA = "x-blazen-fleet-router-token"
#: how a peer's refusal of a RunStep whose state is a delta from a state it does not hold begins
#: (FAILED_PRECONDITION; restarted, evicted, another replica): nothing ran, the router resends whole state.
STATE_NOT_HELD = "run state not held"

#: how the admission's refusal over ``--max-concurrent-workflows`` begins (a router retries such a call on
#: another replica: nothing ran).
CONCURRENCY_REFUSED = "too many concurrent sub-workflows"

#: the HTTP/JSON shim's routes (all POST).
ROUTE_INVOKE = "/v1/peer/invoke_sub_workflow"
ROUTE_DEREF = "/v1/peer/deref_session_ref"
ROUTE_RELEASE = "/v1/peer/release_session_ref"

#: each gRPC path and HTTP route -> the RPC name (metrics label the two transports alike).
RPC_NAMES = {
    PATH_INVOKE: METHOD_INVOKE,
    PATH_STREAM: METHOD_STREAM,
    PATH_DEREF: METHOD_DEREF,
    PATH_RELEASE: METHOD_RELEASE,
    PATH_RUN_STEP: METHOD_RUN_STEP,
    ROUTE_INVOKE: METHOD_INVOKE,
    ROUTE_DEREF: METHOD_DEREF,
    ROUTE_RELEASE: METHOD_RELEASE,
}

# Metadata keys (gRPC, lower case as grpcio hands them over) and their HTTP header spelling.
NODE_ID_METADATA = "x-blazen-peer-node-id"
NODE_ID_HEADER = "X-Blazen-Peer-Node-Id"
#: set on a session-ref call forwarded by a sibling replica (never forwarded again).
FORWARDED_METADATA = "x-blazen-forwarded"
REQUEST_ID_METADATA = "x-request-id"
REQUEST_ID_HEADER = "X-Request-Id"
AUTHORIZATION_METADATA = "authorization"
AUTHORIZATION_HEADER = "Authorization"
#: the environment variable Blazen's clients read their bearer token from (and so does ``blazen-peer``).
TOKEN_ENV = "BLAZEN_PEER_TOKEN"
