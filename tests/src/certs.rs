//! Test certificates made with `openssl`: a private CA and a certificate for `localhost` signed
//! by it, for the relay's TLS listener and for clients trusting that CA through `--ca-cert`.

use crate::s;
use std::path::PathBuf;

/// The files of a private CA and a certificate for `localhost` signed by it.
pub struct TestCerts {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Makes a private CA (`/CN=backhaul test CA`) and a certificate for `localhost`
/// (`subjectAltName=DNS:localhost,IP:127.0.0.1`) signed by it, both valid for two days, in a new scratch
/// directory.
pub async fn test_certs() -> TestCerts {
    let dir = crate::scratch_dir("tls");
    let (ca, ca_key, csr) = (dir.join("ca.pem"), dir.join("ca.key"), dir.join("leaf.csr"));
    let (cert, key, ext) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("leaf.ext"),
    );
    std::fs::write(
        &ext,
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .expect("write extensions");
    let p = |path: &PathBuf| path.display().to_string();
    for args in [
        vec![
            s("req"),
            s("-x509"),
            s("-newkey"),
            s("rsa:2048"),
            s("-nodes"),
            s("-days"),
            s("2"),
            s("-subj"),
            s("/CN=backhaul test CA"),
            s("-keyout"),
            p(&ca_key),
            s("-out"),
            p(&ca),
        ],
        vec![
            s("req"),
            s("-newkey"),
            s("rsa:2048"),
            s("-nodes"),
            s("-subj"),
            s("/CN=localhost"),
            s("-keyout"),
            p(&key),
            s("-out"),
            p(&csr),
        ],
        vec![
            s("x509"),
            s("-req"),
            s("-in"),
            p(&csr),
            s("-CA"),
            p(&ca),
            s("-CAkey"),
            p(&ca_key),
            s("-CAcreateserial"),
            s("-days"),
            s("2"),
            s("-extfile"),
            p(&ext),
            s("-out"),
            p(&cert),
        ],
    ] {
        let out = tokio::process::Command::new("openssl")
            .args(&args)
            .output()
            .await
            .expect("openssl is needed to make test certificates");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    TestCerts { ca, cert, key }
}
