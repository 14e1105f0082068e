//! Pooled HTTP/2 connections: one per upstream (replica address + TLS server name), and one to the
//! grpcio server's private unix socket. A connection that failed or was sent GOAWAY is replaced on the
//! next call; a call that could not be sent on it (nothing left this process) goes on a new one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::TlsConnector;

/// How long opening a connection (TCP + TLS + HTTP/2 preface) may take before the upstream counts as
/// unreachable.
const CONNECT_SECS: u64 = 5;

/// Why no request could be sent: the upstream cannot have seen the call.
pub struct ConnectError(pub String);

pub struct Upstreams {
    pub hop_tls: RwLock<Option<Arc<ClientConfig>>>,
    conns: Mutex<HashMap<String, SendRequest<Bytes>>>,
}

fn builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(4 << 20)
        .initial_connection_window_size(16 << 20)
        .max_frame_size(1 << 20);
    b
}

async fn handshake<T>(io: T) -> Result<SendRequest<Bytes>, String>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = builder().handshake(io).await.map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

impl Upstreams {
    pub fn new(hop_tls: Option<Arc<ClientConfig>>) -> Self {
        Upstreams {
            hop_tls: RwLock::new(hop_tls),
            conns: Mutex::new(HashMap::new()),
        }
    }

    /// New calls open new connections (after the hop's certificate was reloaded).
    pub fn reset(&self) {
        self.conns.lock().unwrap().clear();
    }

    async fn open(&self, target: &Target) -> Result<SendRequest<Bytes>, String> {
        match target {
            Target::Unix(path) => {
                handshake(UnixStream::connect(path).await.map_err(|e| e.to_string())?).await
            }
            Target::Tcp { addr, server_name } => {
                let tcp = TcpStream::connect(addr.as_str())
                    .await
                    .map_err(|e| e.to_string())?;
                let _ = tcp.set_nodelay(true);
                let tls = self.hop_tls.read().unwrap().clone();
                match tls {
                    None => handshake(tcp).await,
                    Some(cfg) => {
                        let host = server_name
                            .clone()
                            .unwrap_or_else(|| host_of(addr).to_string());
                        let name = ServerName::try_from(host).map_err(|e| e.to_string())?;
                        let stream = TlsConnector::from(cfg)
                            .connect(name, tcp)
                            .await
                            .map_err(|e| e.to_string())?;
                        handshake(stream).await
                    }
                }
            }
        }
    }

    /// A connection ready for one more stream.
    pub async fn ready(&self, target: &Target) -> Result<SendRequest<Bytes>, ConnectError> {
        let key = target.key();
        let pooled = self.conns.lock().unwrap().get(&key).cloned();
        if let Some(send) = pooled {
            if let Ok(send) = send.ready().await {
                return Ok(send);
            }
            self.conns.lock().unwrap().remove(&key);
        }
        let opened =
            tokio::time::timeout(Duration::from_secs(CONNECT_SECS), self.open(target)).await;
        let send = match opened {
            Ok(Ok(send)) => send,
            Ok(Err(e)) => return Err(ConnectError(e)),
            Err(_) => return Err(ConnectError("connection timed out".into())),
        };
        let send = send
            .ready()
            .await
            .map_err(|e| ConnectError(e.to_string()))?;
        self.conns.lock().unwrap().insert(key, send.clone());
        Ok(send)
    }
}

fn host_of(addr: &str) -> &str {
    let host = match addr.rfind(':') {
        Some(i) => &addr[..i],
        None => addr,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

pub enum Target {
    Unix(String),
    Tcp {
        addr: String,
        server_name: Option<String>,
    },
}

impl Target {
    fn key(&self) -> String {
        match self {
            Target::Unix(p) => format!("unix:{p}"),
            Target::Tcp { addr, server_name } => {
                format!("{addr}|{}", server_name.as_deref().unwrap_or(""))
            }
        }
    }

    pub fn authority(&self) -> &str {
        match self {
            Target::Unix(_) => "localhost",
            Target::Tcp { addr, .. } => addr,
        }
    }

    pub fn scheme(&self, tls: bool) -> &'static str {
        match self {
            Target::Tcp { .. } if tls => "https",
            _ => "http",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::host_of;

    #[test]
    fn hosts() {
        assert_eq!(host_of("10.0.0.1:50051"), "10.0.0.1");
        assert_eq!(host_of("[::1]:50051"), "::1");
        assert_eq!(host_of("peer.ns.svc"), "peer.ns.svc");
    }
}
