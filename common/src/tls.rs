//! (placeholder until the TLS module lands)
use std::path::Path;
use std::sync::Arc;

pub fn server_config(
    _cert: &Path,
    _key: &Path,
    _alpn: &[Vec<u8>],
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    anyhow::bail!("TLS is not available in this build yet")
}

pub fn client_config(_ca: Option<&Path>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth(),
    ))
}
