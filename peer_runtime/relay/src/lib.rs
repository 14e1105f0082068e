//! `blazen_peer._relay`: the data plane of `blazen-peer route` (docs/router.md). All network I/O runs on
//! the relay's own thread (a current-thread tokio runtime); Python is called, with the GIL, only to decide
//! where a call goes, whether a refused one goes elsewhere, and when it ends.

mod grpc;
mod relay;
mod tls;
mod upstream;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use tokio::sync::watch;

use relay::Shared;
use upstream::Upstreams;

type Pem = Vec<u8>;

fn value_error(e: String) -> PyErr {
    PyValueError::new_err(e)
}

fn client_config(
    hop: Option<(Option<Pem>, Option<Pem>, Pem)>,
) -> PyResult<Option<Arc<rustls::ClientConfig>>> {
    hop.map(|(cert, key, ca)| {
        tls::client_config(cert.as_deref(), key.as_deref(), &ca).map(Arc::new)
    })
    .transpose()
    .map_err(value_error)
}

#[pyclass(frozen)]
struct Relay {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

#[pymethods]
impl Relay {
    /// `policy.decide` is asked about calls to the `relayed` paths, with the values of the three
    /// `metadata` keys (`relay.METADATA`). `tls`: (cert chain, key, CA or None) of the listener, the CA meaning client certificates are
    /// required; None: plaintext. `hop_tls`: (cert or None, key or None, CA) for the replicas; None:
    /// plaintext hops.
    #[new]
    #[pyo3(signature = (policy, relayed, fallback, *, metadata, tls, hop_tls, max_connections, handshake_timeout, max_connection_age, max_request_bytes))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        policy: Py<PyAny>,
        relayed: Vec<String>,
        fallback: String,
        metadata: [String; 3],
        tls: Option<(Pem, Pem, Option<Pem>)>,
        hop_tls: Option<(Option<Pem>, Option<Pem>, Pem)>,
        max_connections: usize,
        handshake_timeout: f64,
        max_connection_age: f64,
        max_request_bytes: usize,
    ) -> PyResult<Self> {
        let tls = tls
            .map(|(c, k, ca)| tls::server_config(&c, &k, ca.as_deref()))
            .transpose()
            .map_err(value_error)?
            .map(|cfg| RwLock::new(Arc::new(cfg)));
        let [node, rid, auth] = metadata.map(|k| {
            http::HeaderName::from_bytes(k.as_bytes()).map_err(|e| value_error(e.to_string()))
        });
        let shared = Shared {
            policy,
            relayed,
            metadata: [node?, rid?, auth?],
            fallback,
            tls,
            upstreams: Upstreams::new(client_config(hop_tls)?),
            max_connections,
            handshake_timeout: Duration::from_secs_f64(handshake_timeout),
            max_age: (max_connection_age > 0.0)
                .then(|| Duration::from_secs_f64(max_connection_age)),
            max_request: max_request_bytes,
            connections: AtomicUsize::new(0),
            shutdown: watch::channel(false).0,
            grace: Mutex::new(Duration::ZERO),
        };
        Ok(Relay {
            shared: Arc::new(shared),
            thread: Mutex::new(None),
        })
    }

    /// Binds `addr` (host:port) and serves on the relay's thread; the bound port.
    fn start(&self, addr: &str) -> PyResult<u16> {
        let listener = std::net::TcpListener::bind(addr)
            .map_err(|e| PyOSError::new_err(format!("{addr}: {e}")))?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        let shared = self.shared.clone();
        let thread = std::thread::Builder::new()
            .name("blazen-relay".into())
            .spawn(move || {
                // The thread keeps one Python thread state for its life (attached once, then detached):
                // each decide/retry/finish then only takes the GIL, where a thread without one would
                // create and destroy a thread state (and map and unmap its frame stack) every time.
                Python::attach(|py| py.detach(|| run(runtime, shared, listener)));
            })?;
        *self.thread.lock().unwrap() = Some(thread);
        Ok(port)
    }

    /// New handshakes use this material (certificate hot reload).
    #[pyo3(signature = (cert, key, ca))]
    fn set_tls(&self, cert: Pem, key: Pem, ca: Option<Pem>) -> PyResult<()> {
        let Some(current) = &self.shared.tls else {
            return Err(PyValueError::new_err("the relay listens in plaintext"));
        };
        let cfg = tls::server_config(&cert, &key, ca.as_deref()).map_err(value_error)?;
        *current.write().unwrap() = Arc::new(cfg);
        Ok(())
    }

    /// New hops use this material; pooled connections are replaced as new calls come.
    #[pyo3(signature = (hop_tls))]
    fn set_hop_tls(&self, hop_tls: Option<(Option<Pem>, Option<Pem>, Pem)>) -> PyResult<()> {
        *self.shared.upstreams.hop_tls.write().unwrap() = client_config(hop_tls)?;
        self.shared.upstreams.reset();
        Ok(())
    }

    /// Connections open now (the cap counts them).
    fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Stops listening, sends GOAWAY on every connection and waits up to `grace` seconds for the calls in
    /// flight; then cancels the rest. Blocks (without the GIL): call it from a worker thread.
    fn stop(&self, py: Python<'_>, grace: f64) {
        *self.shared.grace.lock().unwrap() = Duration::from_secs_f64(grace.max(0.0));
        // send_replace, not send: send stores nothing while no receiver exists (a stop before the relay's
        // thread began serving), and the relay would then serve on and the join below never return.
        self.shared.shutdown.send_replace(true);
        let thread = self.thread.lock().unwrap().take();
        if let Some(t) = thread {
            py.detach(|| {
                let _ = t.join();
            });
        }
    }
}

/// The relay's thread: serves until stopped, then gives the calls in flight the grace to finish; dropping
/// the runtime cancels whatever still runs.
fn run(runtime: tokio::runtime::Runtime, shared: Arc<Shared>, listener: std::net::TcpListener) {
    runtime.block_on(async move {
        let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
            return;
        };
        relay::serve(shared.clone(), listener).await;
        // Stopping: each connection was sent GOAWAY.
        let deadline = Instant::now() + *shared.grace.lock().unwrap();
        while shared.connections.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

#[pymodule]
fn _relay(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Relay>()?;
    Ok(())
}
