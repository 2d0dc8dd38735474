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
