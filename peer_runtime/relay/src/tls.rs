//! rustls configurations from the PEM bytes Python already loads and validates (pki/): the listener's
//! (client certificates verified against the CA when mutual TLS is configured) and the hop's.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let out: Result<Vec<_>, _> = rustls_pemfile::certs(&mut &pem[..]).collect();
    let out = out.map_err(|e| format!("bad certificate PEM: {e}"))?;
    if out.is_empty() {
        return Err("no certificate in PEM".into());
    }
    Ok(out)
}

fn key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|e| format!("bad private key PEM: {e}"))?
        .ok_or_else(|| "no private key in PEM".to_string())
}

fn roots(pem: &[u8]) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    for c in certs(pem)? {
        store
            .add(c)
            .map_err(|e| format!("bad CA certificate: {e}"))?;
    }
    Ok(store)
}

/// The listener: `ca` given means mutual TLS (a client certificate chained to it is required).
pub fn server_config(
    cert: &[u8],
    key_pem: &[u8],
    ca: Option<&[u8]>,
) -> Result<ServerConfig, String> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match ca {
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                    .build()
                    .map_err(|e| e.to_string())?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder
        .with_single_cert(certs(cert)?, key(key_pem)?)
        .map_err(|e| e.to_string())?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// The hop: servers verified against `ca`; the client identity when `cert`/`key` are given.
pub fn client_config(
    cert: Option<&[u8]>,
    key_pem: Option<&[u8]>,
    ca: &[u8],
) -> Result<ClientConfig, String> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots(ca)?);
    let mut cfg = match (cert, key_pem) {
        (Some(c), Some(k)) => builder
            .with_client_auth_cert(certs(c)?, key(k)?)
            .map_err(|e| e.to_string())?,
        _ => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}
