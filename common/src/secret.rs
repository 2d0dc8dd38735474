//! Secrets (tokens) as every program takes them: from a flag or the environment, or from a file
//! (`--*-token-file`, which keeps them out of `ps` and shell history), never empty, never printed.
//! The relay stores and compares only their SHA-256 ([`SecretHash`]).

use sha2::{Digest, Sha256};
use std::fmt;
use std::path::{Path, PathBuf};

/// Prefix of secrets made by `backhaul-relay new-secret` (recognisable in a leaked file or log).
pub const GENERATED_PREFIX: &str = "bh_";

/// A bearer token. Its `Debug` and `Display` never show the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The token itself, for an `Authorization` header.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn hash(&self) -> SecretHash {
        SecretHash::of(self.0.as_bytes())
    }

    /// A fresh random secret: 256 bits, base64url, with [`GENERATED_PREFIX`].
    pub fn generate() -> Self {
        use base64::Engine;
        let bytes: [u8; 32] = rand::random();
        Self(format!(
            "{GENERATED_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        ))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The SHA-256 of a secret: what credential files hold and what links are bound to. Secrets are
/// random (see [`Secret::generate`]), so a fast hash is the right one: there is nothing to
/// guess that a slow hash would protect.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SecretHash([u8; 32]);

impl SecretHash {
    pub fn of(secret: &[u8]) -> Self {
        Self(Sha256::digest(secret).into())
    }

    /// Parses `sha256:<64 hex digits>`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let hex = s.strip_prefix("sha256:").ok_or_else(|| {
            format!("'{s}' is not a secret hash; expected sha256:<64 hex digits> (backhaul-relay hash-secret makes one)")
        })?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex, &mut out)
            .map_err(|_| format!("'{s}' is not a secret hash: after sha256: come 64 hex digits"))?;
        Ok(Self(out))
    }

    /// Equality whose time does not depend on where the hashes differ.
    pub fn matches(&self, other: &SecretHash) -> bool {
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }

    /// A short, safe-to-log name of the credential (the first 8 hex digits of its hash).
    pub fn fingerprint(&self) -> String {
        hex::encode(&self.0[..4])
    }
}

impl fmt::Display for SecretHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretHash({})", self.fingerprint())
    }
}

/// Why a secret could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("{flag} (or {}) is empty; an empty token would turn authentication off. Give a real token (backhaul-relay new-secret makes one) or leave the option out", env_var(flag))]
    Empty { flag: String },
    #[error("{flag}-file {path} is empty; an empty token would turn authentication off. Put a real token in it (backhaul-relay new-secret makes one) or leave the option out")]
    EmptyFile { flag: String, path: PathBuf },
    #[error("{flag} and {flag}-file both given; use one")]
    Both { flag: String },
    #[error("could not read {flag}-file {path}: {error}")]
    Unreadable {
        flag: String,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{flag}-file {path} holds more than one line; put only the token in it")]
    MultiLine { flag: String, path: PathBuf },
    #[error(
        "{flag} holds a control character, which an HTTP header cannot carry; use printable text"
    )]
    ControlCharacter { flag: String },
}

/// The environment variable of `--<flag>`, as every program names it.
fn env_var(flag: &str) -> String {
    format!(
        "BACKHAUL_{}",
        flag.trim_start_matches('-')
            .to_uppercase()
            .replace('-', "_")
    )
}

/// The secret given by `--<flag>` (or its environment variable) or `--<flag>-file`, if any.
/// Refuses an empty one, both at once, an unreadable file, and control characters (secrets
/// travel in HTTP headers). A file's trailing newline is not part of the secret.
pub fn load(
    flag: &str,
    value: Option<String>,
    file: Option<&Path>,
) -> Result<Option<Secret>, SecretError> {
    let flag = format!("--{flag}");
    let secret = match (value, file) {
        (Some(_), Some(_)) => return Err(SecretError::Both { flag }),
        (None, None) => return Ok(None),
        (Some(v), None) => v,
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).map_err(|error| SecretError::Unreadable {
                flag: flag.clone(),
                path: path.to_path_buf(),
                error,
            })?;
            let text = text.trim_end_matches(['\n', '\r']);
            if text.contains('\n') {
                return Err(SecretError::MultiLine {
                    flag,
                    path: path.to_path_buf(),
                });
            }
            if text.trim().is_empty() {
                return Err(SecretError::EmptyFile {
                    flag,
                    path: path.to_path_buf(),
                });
            }
            warn_if_readable_by_others(&flag, path);
            text.to_string()
        }
    };
    if secret.trim().is_empty() {
        return Err(SecretError::Empty { flag });
    }
    if secret.chars().any(char::is_control) {
        return Err(SecretError::ControlCharacter { flag });
    }
    Ok(Some(Secret(secret)))
}

fn warn_if_readable_by_others(flag: &str, path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                "{flag}-file {} can be read by other users (mode {:o}); chmod 600 it",
                path.display(),
                mode & 0o777
            );
        }
    }
}

/// An `Authorization: Bearer` header value for `secret`, marked sensitive so that no `Debug`
/// print (ours or a library's trace logs) and no HTTP/2 header compression ever shows it.
pub fn bearer(secret: &Secret) -> http::HeaderValue {
    let mut v = http::HeaderValue::from_str(&format!("Bearer {}", secret.expose()))
        .unwrap_or_else(|_| http::HeaderValue::from_static("Bearer invalid-token-characters"));
    v.set_sensitive(true);
    v
}

/// The bearer token of a request's `Authorization` header, if it has one.
pub fn presented(headers: &http::HeaderMap) -> Option<&str> {
    headers
        .get(http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn secrets_never_print() {
        let s = Secret("hunter2".into());
        assert!(!format!("{s:?}").contains("hunter2"));
        let h = bearer(&s);
        assert!(h.is_sensitive());
        assert!(!format!("{h:?}").contains("hunter2"));
    }

    #[test]
    fn hashes_round_trip_and_refuse_garbage() {
        let h = SecretHash::of(b"abc");
        assert_eq!(
            h.to_string(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(SecretHash::parse(&h.to_string()).unwrap().matches(&h));
        assert!(SecretHash::parse("abc").is_err());
        assert!(SecretHash::parse("sha256:zz").is_err());
        assert!(SecretHash::parse(&format!("sha256:{}", "0".repeat(63))).is_err());
        assert!(!SecretHash::of(b"abd").matches(&h));
    }

    #[test]
    fn generated_secrets_are_long_and_distinct() {
        let (a, b) = (Secret::generate(), Secret::generate());
        assert_ne!(a, b);
        assert!(a.expose().starts_with(GENERATED_PREFIX) && a.expose().len() == 3 + 43);
    }

    #[test]
    fn loading_refuses_empty_both_and_multi_line() {
        assert!(load("agent-token", None, None).unwrap().is_none());
        assert!(matches!(
            load("agent-token", Some(String::new()), None),
            Err(SecretError::Empty { .. })
        ));
        assert!(matches!(
            load("agent-token", Some("  ".into()), None),
            Err(SecretError::Empty { .. })
        ));
        let empty = load("agent-token", Some(String::new()), None).unwrap_err();
        assert!(
            empty
                .to_string()
                .starts_with("--agent-token (or BACKHAUL_AGENT_TOKEN) is empty"),
            "{empty}"
        );
        for bad in ["a\tb", "a\rb", "tok\u{7f}"] {
            assert!(matches!(
                load("agent-token", Some(bad.into()), None),
                Err(SecretError::ControlCharacter { .. })
            ));
        }
        let dir = std::env::temp_dir().join(format!("backhaul-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::File::create(&file)
            .unwrap()
            .write_all(b"s3cret\n")
            .unwrap();
        assert_eq!(
            load("agent-token", None, Some(&file))
                .unwrap()
                .unwrap()
                .expose(),
            "s3cret"
        );
        assert!(matches!(
            load("agent-token", Some("x".into()), Some(&file)),
            Err(SecretError::Both { .. })
        ));
        std::fs::write(&file, "\n").unwrap();
        let empty = load("agent-token", None, Some(&file)).unwrap_err();
        assert!(matches!(empty, SecretError::EmptyFile { .. }));
        assert!(
            empty.to_string().starts_with("--agent-token-file ")
                && empty.to_string().contains(" is empty"),
            "{empty}"
        );
        std::fs::write(&file, "a\nb\n").unwrap();
        assert!(matches!(
            load("agent-token", None, Some(&file)),
            Err(SecretError::MultiLine { .. })
        ));
        assert!(matches!(
            load("agent-token", None, Some(&dir.join("missing"))),
            Err(SecretError::Unreadable { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
