//! Loading certificates and keys into rustls configurations. The ring provider is named
//! explicitly, so nothing depends on a process-wide default.

use anyhow::{bail, Context};
use std::path::Path;
use std::sync::Arc;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    let pem = std::fs::read(path)
        .with_context(|| format!("could not read certificate file {}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not a valid PEM certificate file", path.display()))?;
    if certs.is_empty() {
        bail!(
            "{} holds no certificate (expected PEM blocks starting with -----BEGIN CERTIFICATE-----)",
            path.display()
        );
    }
    Ok(certs)
}

/// A server configuration from a PEM certificate chain and a PEM private key, offering the
/// given ALPN protocols.
pub fn server_config(
    cert: &Path,
    key: &Path,
    alpn: &[Vec<u8>],
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let certs = read_certs(cert)?;
    let key_pem = std::fs::read(key)
        .with_context(|| format!("could not read private key file {}", key.display()))?;
    let key_der = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .with_context(|| format!("{} is not a valid PEM key file", key.display()))?
        .with_context(|| {
            format!(
                "{} holds no private key (expected a PKCS#8, PKCS#1 or SEC1 PEM block)",
                key.display()
            )
        })?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS provider offers no protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .with_context(|| {
            format!(
                "certificate {} and key {} do not make a usable pair",
                cert.display(),
                key.display()
            )
        })?;
    config.alpn_protocols = alpn.to_vec();
    Ok(Arc::new(config))
}

/// A client configuration trusting the public web roots, plus the CA certificates in `extra_ca`.
pub fn client_config(extra_ca: Option<&Path>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = extra_ca {
        for cert in read_certs(path)? {
            roots
                .add(cert)
                .with_context(|| format!("{} holds an unusable CA certificate", path.display()))?;
        }
    }
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("TLS provider offers no protocol versions")?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clear_errors_for_missing_and_empty_files() {
        let dir = std::env::temp_dir().join(format!("backhaul-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a pem").unwrap();
        let e = server_config(&dir.join("nope.pem"), &empty, &[]).unwrap_err();
        assert!(
            format!("{e:#}").contains("could not read certificate file"),
            "{e:#}"
        );
        let e = client_config(Some(&empty)).unwrap_err();
        assert!(format!("{e:#}").contains("holds no certificate"), "{e:#}");
        assert!(client_config(None).is_ok());
        let _ = std::fs::remove_dir_all(dir);
    }
}
