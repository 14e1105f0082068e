//! The listener and the per-call path: read the request, ask Python where it goes (one call), forward the
//! bytes unchanged to that replica, stream the answer back; everything else to the grpcio server behind.

use std::future::poll_fn;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::{sleep_until, Instant};
use tokio_rustls::TlsAcceptor;

use crate::grpc::{self, LastMessage};
use crate::upstream::{Target, Upstreams};

pub struct Shared {
    /// `RelayPolicy` (blazen_peer.routing.relay): `decide(path, request, metadata) -> RelayCall | None`.
    pub policy: Py<PyAny>,
    /// The paths the relay forwards itself (Invoke, Stream: blazen_peer.wire.protocol's).
    pub relayed: Vec<String>,
    /// The metadata `decide` is given (`relay.METADATA`: node id, request id, token).
    pub metadata: [HeaderName; 3],
    /// The grpcio server's private unix socket: what the relay does not forward itself.
    pub fallback: String,
    /// The listener's TLS (None: plaintext, only when the router's configuration has no TLS).
    pub tls: Option<RwLock<Arc<ServerConfig>>>,
    pub upstreams: Upstreams,
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub max_age: Option<Duration>,
    pub max_request: usize,
    pub connections: AtomicUsize,
    pub shutdown: watch::Sender<bool>,
    pub grace: Mutex<Duration>,
}

type Status = (u32, String);

/// A call's headers (its metadata) at most: grpcio's own hard limit for incoming metadata. Headers arrive
/// before any credential is checked, and h2's default (16 MiB per stream) would let a caller without one
/// make the relay hold gigabytes across a connection's streams.
const MAX_HEADER_LIST: u32 = 16 << 10;

fn server_builder() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(4 << 20)
        .initial_connection_window_size(16 << 20)
        .max_frame_size(1 << 20)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_concurrent_streams(1000);
    b
}

/// Counts a connection for the cap while it lives.
struct Counted(Arc<Shared>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn sleep_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => sleep_until(d).await,
        None => std::future::pending().await,
    }
}

pub async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    let mut stop = shared.shutdown.subscribe();
    loop {
        tokio::select! {
            acc = listener.accept() => {
                let Ok((tcp, _)) = acc else { continue };
                // Past the cap a new connection is closed at accept, as grpc's own cap does.
                if shared.connections.fetch_add(1, Ordering::SeqCst) >= shared.max_connections {
                    shared.connections.fetch_sub(1, Ordering::SeqCst);
                    continue;
                }
                let guard = Counted(shared.clone());
                tokio::spawn(async move {
                    let s = guard.0.clone();
                    s.connection(tcp).await;
                    drop(guard);
                });
            }
            // wait_for, not changed: a stop that came before this subscription is seen too
            _ = stop.wait_for(|stopping| *stopping) => break,
        }
    }
}

impl Shared {
    async fn connection(self: Arc<Self>, tcp: TcpStream) {
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => self.h2(tcp).await,
            Some(cfg) => {
                // New handshakes take the material in force now (hot reload: set_tls).
                let acceptor = TlsAcceptor::from(cfg.read().unwrap().clone());
                if let Ok(Ok(stream)) =
                    tokio::time::timeout(self.handshake_timeout, acceptor.accept(tcp)).await
                {
                    self.h2(stream).await
                }
            }
        }
    }

    async fn h2<T>(self: Arc<Self>, io: T)
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        let Ok(Ok(mut conn)) =
            tokio::time::timeout(self.handshake_timeout, server_builder().handshake(io)).await
        else {
            return;
        };
        let mut stop = self.shutdown.subscribe();
        let mut closing = *stop.borrow();
        if closing {
            conn.graceful_shutdown();
        }
        let age = sleep_opt(self.max_age.map(|a| Instant::now() + a));
        tokio::pin!(age);
        loop {
            tokio::select! {
                next = conn.accept() => match next {
                    Some(Ok((req, respond))) => {
                        tokio::spawn(self.clone().handle(req, respond));
                    }
                    _ => break,
                },
                // Past the maximum age, or on stop: GOAWAY, the calls in flight finish.
                _ = &mut age, if !closing => { conn.graceful_shutdown(); closing = true; }
                _ = stop.changed(), if !closing => { conn.graceful_shutdown(); closing = true; }
            }
        }
    }

    async fn handle(self: Arc<Self>, req: Request<RecvStream>, mut respond: SendResponse<Bytes>) {
        let (parts, mut body) = req.into_parts();
        let deadline = parts
            .headers
            .get("grpc-timeout")
            .and_then(|v| grpc::parse_timeout(v.as_bytes()))
            .map(|d| Instant::now() + d);
        let request = match read_body(&mut body, self.max_request).await {
            Ok(b) => b,
            Err(Some(st)) => return send_status(&mut respond, st.0, &st.1),
            Err(None) => return, // the caller reset the stream
        };
        let path = parts.uri.path();
        // One uncompressed message; anything else (compressed, malformed) is the grpcio server's.
        let plain =
            matches!(grpc::frame_header(&request), Some((false, n)) if n + 5 == request.len());
        if plain && self.relayed.iter().any(|p| p == path) {
            if let Some((call, target)) = self.decide(path, &request, &parts.headers) {
                return self
                    .forward(call, target, path, request, deadline, respond)
                    .await;
            }
        }
        self.handover(parts, request, respond).await
    }

    // -- Invoke / Stream on a replica ----------
    async fn forward(
        &self,
        call: Py<PyAny>,
        target: CallTarget,
        path: &str,
        request: Bytes,
        deadline: Option<Instant>,
        mut respond: SendResponse<Bytes>,
    ) {
        let outcome = tokio::select! {
            r = self.upstream_response(&call, target, path, &request, deadline) => r,
            _ = poll_fn(|cx| respond.poll_reset(cx)) => {
                // Dropping the upstream call resets its stream: the replica sees the cancellation.
                return finish(&call, grpc::CANCELLED, "cancelled by the caller", None);
            }
            _ = sleep_opt(deadline) => Err((grpc::DEADLINE_EXCEEDED, "Deadline Exceeded".to_string())),
        };
        match outcome {
            Err((code, details)) => {
                send_status(&mut respond, code, &details);
                finish(&call, code, &details, None);
            }
            Ok(up) => {
                let (code, details, last) = pipe(up, respond, deadline, true).await;
                finish(&call, code, &details, last);
            }
        }
    }

    /// The response of the replica the policy chose, or of another one while they refuse before running.
    async fn upstream_response(
        &self,
        call: &Py<PyAny>,
        first: CallTarget,
        path: &str,
        request: &Bytes,
        deadline: Option<Instant>,
    ) -> Result<Upstream, Status> {
        let tls = self.upstreams.hop_tls.read().unwrap().is_some();
        let mut next = first;
        loop {
            let (addr, server_name, metadata) = next;
            let target = Target::Tcp {
                addr: addr.clone(),
                server_name,
            };
            let mut headers = HeaderMap::with_capacity(8 + metadata.len());
            if let Some(d) = deadline {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err((grpc::DEADLINE_EXCEEDED, "Deadline Exceeded".into()));
                }
                headers.insert(
                    "grpc-timeout",
                    HeaderValue::from_str(&grpc::format_timeout(left)).unwrap(),
                );
            }
            for (k, v) in &metadata {
                if let (Ok(k), Ok(v)) = (
                    HeaderName::from_bytes(k.as_bytes()),
                    HeaderValue::from_str(v),
                ) {
                    headers.append(k, v);
                }
            }
            let refused = match self.send(&target, tls, path, headers, request).await {
                Ok(resp) => {
                    let up = Upstream::first_message(resp).await;
                    match up.refusal() {
                        // a refusal before any message (draining, admission): the policy says whether
                        // another replica gets the call
                        Some((code, details)) => (code, details, Ok(up)),
                        None => return Ok(up),
                    }
                }
                Err(Sent::Not(why)) => {
                    let st = (
                        grpc::UNAVAILABLE,
                        format!("failed to connect to {addr}: {why}"),
                    );
                    (st.0, st.1.clone(), Err(st))
                }
                Err(Sent::Maybe(why)) => {
                    return Err((grpc::UNAVAILABLE, format!("relay: upstream {addr}: {why}")))
                }
            };
            match retry(call, refused.0, &refused.1) {
                Some(t) => next = t,
                None => return refused.2,
            }
        }
    }

    async fn send(
        &self,
        target: &Target,
        tls: bool,
        path: &str,
        headers: HeaderMap,
        request: &Bytes,
    ) -> Result<Response<RecvStream>, Sent> {
        let mut send = self
            .upstreams
            .ready(target)
            .await
            .map_err(|e| Sent::Not(e.0))?;
        let mut req = Request::post(format!(
            "{}://{}{}",
            target.scheme(tls),
            target.authority(),
            path
        ))
        .body(())
        .map_err(|e| Sent::Not(e.to_string()))?;
        let h = req.headers_mut();
        *h = headers;
        h.insert("content-type", HeaderValue::from_static("application/grpc"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("user-agent", HeaderValue::from_static("blazen-relay"));
        // An error here means nothing was sent.
        let (fut, mut stream) = send
            .send_request(req, false)
            .map_err(|e| Sent::Not(e.to_string()))?;
        // Without waiting for flow-control capacity: the request is in memory already (at most
        // `max_request`), and waiting would make h2 write the headers alone first - one more write here
        // and one more wake-up on the replica for every call.
        if let Err(e) = stream.send_data(request.clone(), true) {
            return Err(Sent::Maybe(e.to_string()));
        }
        fut.await.map_err(|e| {
            if e.reason() == Some(Reason::REFUSED_STREAM) {
                // HTTP/2 guarantees a refused stream was not processed
                Sent::Not(format!("stream refused: {e}"))
            } else {
                Sent::Maybe(e.to_string())
            }
        })
    }

    // -- everything else: the grpcio server ----------
    async fn handover(
        &self,
        parts: http::request::Parts,
        request: Bytes,
        mut respond: SendResponse<Bytes>,
    ) {
        let target = Target::Unix(self.fallback.clone());
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let resp = tokio::select! {
            r = self.send(&target, false, path, parts.headers, &request) => r,
            _ = poll_fn(|cx| respond.poll_reset(cx)) => return,
        };
        match resp {
            Ok(resp) => {
                let up = Upstream {
                    resp,
                    first: None,
                    trailers: None,
                };
                pipe(up, respond, None, false).await;
            }
            Err(Sent::Not(e) | Sent::Maybe(e)) => send_status(
                &mut respond,
                grpc::UNAVAILABLE,
                &format!("relay: the router's gRPC server: {e}"),
            ),
        }
    }

    /// `RelayPolicy.decide`: the call and its first target, or None (the grpcio server's).
    fn decide(
        &self,
        path: &str,
        request: &Bytes,
        headers: &HeaderMap,
    ) -> Option<(Py<PyAny>, CallTarget)> {
        let [node, rid, auth] = &self.metadata;
        let last = |k: &HeaderName| {
            headers
                .get_all(k)
                .iter()
                .next_back()
                .and_then(|v| v.to_str().ok())
        };
        let (caller, rid) = (last(node), last(rid));
        let authorization = headers.get(auth).and_then(|v| v.to_str().ok());
        Python::attach(|py| {
            // the message without its 5-byte frame header, as grpcio hands it to a handler
            let message = PyBytes::new(py, request.get(5..).unwrap_or_default());
            match self
                .policy
                .call_method1(py, "decide", (path, message, caller, rid, authorization))
                .and_then(|r| r.extract(py))
            {
                Ok(r) => r,
                Err(e) => {
                    // the grpcio server answers it (the same routing code, with its own error handling)
                    e.print(py);
                    None
                }
            }
        })
    }
}

enum Sent {
    /// The upstream cannot have seen the call.
    Not(String),
    /// It may have started.
    Maybe(String),
}

/// `relay.Target`: (replica address, TLS server name, hop metadata).
type CallTarget = (String, Option<String>, Vec<(String, String)>);

/// `RelayCall.retry`: the next target, or None when the refusal is the caller's answer.
fn retry(call: &Py<PyAny>, code: u32, details: &str) -> Option<CallTarget> {
    Python::attach(|py| {
        match call
            .call_method1(py, "retry", (code, details))
            .and_then(|r| r.extract(py))
        {
            Ok(r) => r,
            Err(e) => {
                e.print(py);
                None
            }
        }
    })
}

fn finish(call: &Py<PyAny>, code: u32, details: &str, last: Option<Bytes>) {
    Python::attach(|py| {
        let last = last.map(|b| PyBytes::new(py, &b));
        if let Err(e) = call.call_method1(py, "finish", (code, details, last)) {
            e.print(py);
        }
    })
}

/// The whole request body (unary requests), at most `limit` bytes; Err(None) when the caller reset.
async fn read_body(body: &mut RecvStream, limit: usize) -> Result<Bytes, Option<Status>> {
    let mut first: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|_| None)?;
        let _ = body.flow_control().release_capacity(chunk.len());
        let total = first.as_ref().map_or(0, Bytes::len) + buf.len() + chunk.len();
        if total > limit {
            let msg = format!("Received message larger than max ({total} vs. {limit})");
            return Err(Some((grpc::RESOURCE_EXHAUSTED, msg)));
        }
        // one chunk (the common case) is kept as is, without a copy
        match first.take() {
            None if buf.is_empty() => first = Some(chunk),
            Some(f) => {
                buf.extend_from_slice(&f);
                buf.extend_from_slice(&chunk);
            }
            None => buf.extend_from_slice(&chunk),
        }
    }
    Ok(first.unwrap_or_else(|| buf.freeze()))
}

/// Sends `data` as the stream's flow control allows.
async fn send_all(
    send: &mut SendStream<Bytes>,
    mut data: Bytes,
    eos: bool,
) -> Result<(), h2::Error> {
    if data.is_empty() {
        return send.send_data(data, eos);
    }
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let cap = match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(c)) => c,
            Some(Err(e)) => return Err(e),
            None => return Err(Reason::CANCEL.into()),
        };
        if cap == 0 {
            continue;
        }
        let chunk = data.split_to(cap.min(data.len()));
        send.send_data(chunk, eos && data.is_empty())?;
    }
    Ok(())
}

fn status_headers(code: u32, details: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("grpc-status", HeaderValue::from(code));
    if let Ok(v) = HeaderValue::from_str(&grpc::percent_encode(details)) {
        h.insert("grpc-message", v);
    }
    h
}

/// A trailers-only answer: the call ends with `code` before any message.
fn send_status(respond: &mut SendResponse<Bytes>, code: u32, details: &str) {
    let mut r = Response::new(());
    let h = r.headers_mut();
    *h = status_headers(code, details);
    h.insert("content-type", HeaderValue::from_static("application/grpc"));
    let _ = respond.send_response(r, true);
}

/// An upstream response, with what was read of it before the caller saw anything: its first DATA chunk,
/// or its trailers when it ended without a message.
struct Upstream {
    resp: Response<RecvStream>,
    first: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Upstream {
    /// Reads up to the first message (or the end, when there is none): a refusal is known only then.
    /// grpcio answers a refusal with an empty message before the status, so past an empty message the
    /// next chunk is read too.
    async fn first_message(mut resp: Response<RecvStream>) -> Upstream {
        let body = resp.body_mut();
        let mut first: Option<Bytes> = None;
        while !body.is_end_stream() {
            match body.data().await {
                Some(Ok(chunk)) => {
                    let _ = body.flow_control().release_capacity(chunk.len());
                    let empty = first.is_none() && chunk[..] == EMPTY_MESSAGE;
                    first = Some(match first.take() {
                        None => chunk,
                        Some(f) => [f, chunk].concat().into(),
                    });
                    if !empty {
                        break;
                    }
                }
                // an error is left for pipe() to find again (it may have run: never retried)
                Some(Err(_)) => break,
                None => {
                    let trailers = body.trailers().await.ok().flatten();
                    return Upstream {
                        resp,
                        first,
                        trailers,
                    };
                }
            }
        }
        Upstream {
            resp,
            first,
            trailers: None,
        }
    }

    /// The non-OK status of a response that ended before any message (or with grpcio's empty one).
    fn refusal(&self) -> Option<Status> {
        if self.first.as_deref().is_some_and(|f| f != EMPTY_MESSAGE) {
            return None;
        }
        let headers = match &self.trailers {
            Some(t) => t,
            None if self.first.is_none() && self.resp.body().is_end_stream() => self.resp.headers(),
            None => return None,
        };
        grpc::status(headers).filter(|st| st.0 != grpc::OK)
    }
}

/// A message of no bytes: its frame header alone.
const EMPTY_MESSAGE: [u8; 5] = [0; 5];

/// Streams an upstream response to the caller; its final status, and its last message when `collect`.
async fn pipe(
    up: Upstream,
    mut respond: SendResponse<Bytes>,
    deadline: Option<Instant>,
    collect: bool,
) -> (u32, String, Option<Bytes>) {
    let (rparts, mut rbody) = up.resp.into_parts();
    let mut out = Response::new(());
    *out.status_mut() = rparts.status;
    if rbody.is_end_stream() && up.first.is_none() && up.trailers.is_none() {
        // trailers-only
        let st = grpc::status(&rparts.headers).unwrap_or((
            grpc::UNKNOWN,
            format!(
                "upstream answered HTTP {} without a gRPC status",
                rparts.status
            ),
        ));
        *out.headers_mut() = rparts.headers;
        let _ = respond.send_response(out, true);
        return (st.0, st.1, None);
    }
    *out.headers_mut() = rparts.headers;
    let Ok(mut send) = respond.send_response(out, false) else {
        return (grpc::CANCELLED, "cancelled by the caller".into(), None);
    };
    let mut last = LastMessage::default();
    let cancelled = || (grpc::CANCELLED, "cancelled by the caller".to_string(), None);
    if let Some(chunk) = up.first {
        if collect {
            last.feed(&chunk);
        }
        if send_all(&mut send, chunk, false).await.is_err() {
            return cancelled();
        }
    }
    if up.trailers.is_none() {
        loop {
            let chunk = tokio::select! {
                d = rbody.data() => match d {
                    None => break,
                    Some(Ok(chunk)) => chunk,
                    Some(Err(e)) => return fail(&mut send, grpc::UNAVAILABLE, format!("relay: upstream: {e}")),
                },
                _ = poll_fn(|cx| send.poll_reset(cx)) => return cancelled(),
                _ = sleep_opt(deadline) => {
                    return fail(&mut send, grpc::DEADLINE_EXCEEDED, "Deadline Exceeded".into())
                }
            };
            let n = chunk.len();
            if collect {
                last.feed(&chunk);
            }
            if send_all(&mut send, chunk, false).await.is_err() {
                return cancelled();
            }
            let _ = rbody.flow_control().release_capacity(n);
        }
    }
    let trailers = match up.trailers {
        Some(t) => Ok(Some(t)),
        None => tokio::select! {
            t = rbody.trailers() => t,
            _ = poll_fn(|cx| send.poll_reset(cx)) => return cancelled(),
            _ = sleep_opt(deadline) => return fail(&mut send, grpc::DEADLINE_EXCEEDED, "Deadline Exceeded".into()),
        },
    };
    match trailers {
        Ok(Some(t)) => {
            let st = grpc::status(&t).unwrap_or((
                grpc::UNKNOWN,
                "upstream trailers without a gRPC status".into(),
            ));
            let _ = send.send_trailers(t);
            (st.0, st.1, last.take())
        }
        Ok(None) => fail(
            &mut send,
            grpc::UNKNOWN,
            "upstream ended without trailers".into(),
        ),
        Err(e) => fail(
            &mut send,
            grpc::UNAVAILABLE,
            format!("relay: upstream: {e}"),
        ),
    }
}

fn fail(send: &mut SendStream<Bytes>, code: u32, details: String) -> (u32, String, Option<Bytes>) {
    let _ = send.send_trailers(status_headers(code, &details));
    (code, details, None)
}
