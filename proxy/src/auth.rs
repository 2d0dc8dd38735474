//! Who may do what on the relay: which agents may serve a backend ID and which clients may open
//! sessions to it. Three policies:
//!
//! - **per backend** (`--credentials FILE`): each backend ID names the hashes of its agents'
//!   secrets and of the client secrets allowed to reach it (or says it is public). One relay can
//!   serve many independent sites; a site's secret opens nothing of another's. The file is read
//!   again on SIGHUP: links whose credential was removed are closed, all others keep running.
//! - **shared tokens** (`--agent-token`, `--client-token`): one token per role for every backend,
//!   the simple setup for one site.
//! - **open**: no credentials at all, for trying the stack on one machine.
//!
//! Secrets are compared by SHA-256 only (see [`backhaul_common::secret`]); the relay never holds
//! the secrets of a credentials file.

use backhaul_common::api;
use backhaul_common::refusal_log::RefusalLog;
use backhaul_common::secret::{Secret, SecretHash};
use serde::Deserialize;
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// The credentials in force.
#[derive(Debug)]
pub enum Policy {
    /// Anyone may register agents and open sessions.
    Open,
    /// One token per role for every backend; `None` leaves that role open.
    Shared {
        agent: Option<SecretHash>,
        client: Option<SecretHash>,
    },
    /// Credentials per backend ID, from a file.
    PerBackend {
        path: PathBuf,
        backends: HashMap<String, BackendCredentials>,
    },
}

/// What a credentials file says about one backend ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendCredentials {
    /// Hashes of the secrets its agents may present (several: HA replicas, rotation).
    pub agents: Vec<SecretHash>,
    pub clients: Clients,
    /// Most sessions open to this backend at once (over the relay's default).
    pub max_sessions: Option<usize>,
}

/// Who may open sessions to a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Clients {
    /// Anyone who reaches the relay (a public web app behind the tunnel).
    Public,
    /// Only holders of one of these secrets.
    Only(Vec<SecretHash>),
}

/// Why a request was refused. The HTTP answer stays vague (401 either way, so nobody learns
/// which backend IDs exist); the relay's log says which.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No `Authorization: Bearer` header.
    Missing,
    /// A bearer token that is not a credential of this backend.
    Wrong,
    /// The backend ID is not in the credentials file.
    UnknownBackend,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::Missing => "no bearer token",
            Refusal::Wrong => "a token that is not a credential for this backend",
            Refusal::UnknownBackend => "a backend ID that is not in the credentials file",
        })
    }
}

fn check(allowed: &[SecretHash], presented: Option<&str>) -> Result<SecretHash, Refusal> {
    let got = SecretHash::of(presented.ok_or(Refusal::Missing)?.as_bytes());
    // Every entry is compared, so the time taken does not say which one matched.
    let hit = allowed
        .iter()
        .fold(false, |hit, want| want.matches(&got) | hit);
    if hit {
        Ok(got)
    } else {
        Err(Refusal::Wrong)
    }
}

impl Policy {
    /// The shared-token policy (or open, with neither token).
    pub fn shared(agent: Option<&Secret>, client: Option<&Secret>) -> Self {
        match (agent, client) {
            (None, None) => Policy::Open,
            _ => Policy::Shared {
                agent: agent.map(Secret::hash),
                client: client.map(Secret::hash),
            },
        }
    }

    /// Reads a credentials file.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("could not read credentials file {}: {e}", path.display()))?;
        let backends = parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Policy::PerBackend {
            path: path.to_path_buf(),
            backends,
        })
    }

    /// Whether this policy lets anybody in without a secret, in either role.
    pub fn is_open(&self) -> bool {
        match self {
            Policy::Open => true,
            Policy::Shared { agent, client } => agent.is_none() || client.is_none(),
            Policy::PerBackend { .. } => false,
        }
    }

    /// May an agent presenting `presented` serve `backend`? On success, the credential the link
    /// is bound to (`None` when agents need none).
    pub fn agent(
        &self,
        backend: &str,
        presented: Option<&str>,
    ) -> Result<Option<SecretHash>, Refusal> {
        match self {
            Policy::Open | Policy::Shared { agent: None, .. } => Ok(None),
            Policy::Shared { agent: Some(h), .. } => {
                check(std::slice::from_ref(h), presented).map(Some)
            }
            Policy::PerBackend { backends, .. } => {
                let b = backends.get(backend).ok_or(Refusal::UnknownBackend)?;
                check(&b.agents, presented).map(Some)
            }
        }
    }

    /// May a client presenting `presented` open a session to `backend`?
    pub fn client(&self, backend: &str, presented: Option<&str>) -> Result<(), Refusal> {
        match self {
            Policy::Open | Policy::Shared { client: None, .. } => Ok(()),
            Policy::Shared {
                client: Some(h), ..
            } => check(std::slice::from_ref(h), presented).map(drop),
            Policy::PerBackend { backends, .. } => {
                match &backends
                    .get(backend)
                    .ok_or(Refusal::UnknownBackend)?
                    .clients
                {
                    Clients::Public => Ok(()),
                    Clients::Only(allowed) => check(allowed, presented).map(drop),
                }
            }
        }
    }

    /// Whether a link of `backend` bound to `credential` may go on (after a reload).
    pub fn still_allows(&self, backend: &str, credential: Option<SecretHash>) -> bool {
        match (self, credential) {
            (Policy::Open | Policy::Shared { agent: None, .. }, _) => true,
            (Policy::Shared { agent: Some(h), .. }, Some(c)) => h.matches(&c),
            (Policy::PerBackend { backends, .. }, Some(c)) => backends
                .get(backend)
                .is_some_and(|b| b.agents.iter().any(|h| h.matches(&c))),
            (_, None) => false,
        }
    }

    /// The session cap the policy sets for `backend`, if any.
    pub fn max_sessions(&self, backend: &str) -> Option<usize> {
        match self {
            Policy::PerBackend { backends, .. } => backends.get(backend)?.max_sessions,
            _ => None,
        }
    }

    /// Whether a client's own `Authorization` header is the relay's credential (and so must not
    /// be passed to the backend) for `backend`.
    pub fn consumes_client_authorization(&self, backend: &str) -> bool {
        match self {
            Policy::Open | Policy::Shared { client: None, .. } => false,
            Policy::Shared { .. } => true,
            Policy::PerBackend { backends, .. } => !matches!(
                backends.get(backend).map(|b| &b.clients),
                Some(Clients::Public)
            ),
        }
    }
}

/// A credentials file, as written by the operator (see `dist/credentials.toml`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    backend: HashMap<String, FileBackend>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBackend {
    agents: Vec<String>,
    #[serde(default)]
    clients: Option<Vec<String>>,
    #[serde(default)]
    public: bool,
    #[serde(default)]
    max_sessions: Option<usize>,
}

fn hashes(backend: &str, key: &str, list: &[String]) -> Result<Vec<SecretHash>, String> {
    list.iter()
        .map(|s| SecretHash::parse(s).map_err(|e| format!("backend '{backend}', {key}: {e}")))
        .collect()
}

/// Parses and checks a credentials file's text.
pub fn parse(text: &str) -> Result<HashMap<String, BackendCredentials>, String> {
    let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut out = HashMap::new();
    for (id, b) in file.backend {
        api::validate_backend_id(&id).map_err(|e| format!("[backend.{id}]: {e}"))?;
        if b.agents.is_empty() {
            return Err(format!(
                "[backend.{id}]: agents is empty, so no agent could serve it; add the hash of its agent secret (backhaul-relay new-secret)"
            ));
        }
        let clients = match (b.clients, b.public) {
            (Some(_), true) => {
                return Err(format!(
                    "[backend.{id}]: both clients and public = true; a public backend takes no client secrets"
                ))
            }
            (None, false) => {
                return Err(format!(
                    "[backend.{id}]: say who may open sessions: clients = [\"sha256:...\"] or public = true"
                ))
            }
            (None, true) => Clients::Public,
            (Some(list), false) => {
                if list.is_empty() {
                    return Err(format!(
                        "[backend.{id}]: clients is empty, so nobody could open a session; add client secret hashes or set public = true"
                    ));
                }
                Clients::Only(hashes(&id, "clients", &list)?)
            }
        };
        if b.max_sessions == Some(0) {
            return Err(format!(
                "[backend.{id}]: max_sessions = 0 would refuse every session"
            ));
        }
        out.insert(
            id.clone(),
            BackendCredentials {
                agents: hashes(&id, "agents", &b.agents)?,
                clients,
                max_sessions: b.max_sessions,
            },
        );
    }
    Ok(out)
}

/// The policy in force, swapped whole on reload.
pub struct Auth {
    policy: RwLock<Arc<Policy>>,
    refusals: Arc<RefusalLog>,
}

impl Auth {
    pub fn new(policy: Policy) -> Self {
        Self {
            policy: RwLock::new(Arc::new(policy)),
            refusals: RefusalLog::new("refusals of agents, clients and connections"),
        }
    }

    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reads the credentials file again; `Ok(None)` when there is none (tokens come from flags).
    /// On error the old policy stays in force.
    pub fn reload(&self) -> Result<Option<Arc<Policy>>, String> {
        let path = match &*self.policy() {
            Policy::PerBackend { path, .. } => path.clone(),
            _ => return Ok(None),
        };
        let new = Arc::new(Policy::from_file(&path)?);
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = new.clone();
        Ok(Some(new))
    }

    /// Logs a refusal at WARN, at a bounded rate (see [`RefusalLog`]).
    pub fn log_refusal(&self, line: impl FnOnce() -> String) {
        self.refusals.log(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> String {
        SecretHash::of(s.as_bytes()).to_string()
    }

    fn file() -> String {
        format!(
            r#"
[backend.web]
agents = ["{}", "{}"]
public = true

[backend.db]
agents = ["{}"]
clients = ["{}"]
max_sessions = 5
"#,
            h("web-agent"),
            h("web-replica"),
            h("db-agent"),
            h("db-client")
        )
    }

    #[test]
    fn per_backend_secrets_open_only_their_own_backend() {
        let p = Policy::PerBackend {
            path: "x".into(),
            backends: parse(&file()).unwrap(),
        };
        assert!(p.agent("web", Some("web-agent")).is_ok());
        assert!(p.agent("web", Some("web-replica")).is_ok());
        assert_eq!(p.agent("db", Some("web-agent")), Err(Refusal::Wrong));
        assert_eq!(p.agent("db", None), Err(Refusal::Missing));
        assert_eq!(
            p.agent("other", Some("web-agent")),
            Err(Refusal::UnknownBackend)
        );
        assert!(p.client("web", None).is_ok());
        assert!(p.client("db", Some("db-client")).is_ok());
        assert_eq!(p.client("db", Some("db-agent")), Err(Refusal::Wrong));
        assert_eq!(p.client("nope", None), Err(Refusal::UnknownBackend));
        assert_eq!(p.max_sessions("db"), Some(5));
        let bound = p.agent("db", Some("db-agent")).unwrap();
        assert!(p.still_allows("db", bound));
        assert!(!p.still_allows("web", bound));
        assert!(!p.consumes_client_authorization("web"));
        assert!(p.consumes_client_authorization("db"));
    }

    #[test]
    fn shared_tokens_and_open() {
        let (a, c) = (Secret::generate(), Secret::generate());
        let p = Policy::shared(Some(&a), Some(&c));
        assert!(!p.is_open());
        assert!(p.agent("any", Some(a.expose())).unwrap().is_some());
        assert_eq!(p.agent("any", Some(c.expose())), Err(Refusal::Wrong));
        assert!(p.client("any", Some(c.expose())).is_ok());
        assert_eq!(p.client("any", None), Err(Refusal::Missing));
        let open = Policy::shared(None, None);
        assert!(open.is_open());
        assert_eq!(open.agent("x", None), Ok(None));
        assert!(open.client("x", None).is_ok());
    }

    #[test]
    fn bad_files_are_refused_with_the_key_named() {
        let agent = h("a");
        for (text, want) in [
            (
                "[backend.x]\nagents = []\npublic = true".to_string(),
                "agents is empty",
            ),
            (
                format!("[backend.x]\nagents = [\"{agent}\"]"),
                "say who may open",
            ),
            (
                format!(
                    "[backend.x]\nagents = [\"{agent}\"]\npublic = true\nclients = [\"{agent}\"]"
                ),
                "both clients and public",
            ),
            (
                format!("[backend.x]\nagents = [\"{agent}\"]\nclients = []"),
                "clients is empty",
            ),
            (
                "[backend.x]\nagents = [\"plaintext\"]\npublic = true".to_string(),
                "not a secret hash",
            ),
            (
                format!("[backend.\"a b\"]\nagents = [\"{agent}\"]\npublic = true"),
                "[backend.a b]",
            ),
            (
                format!("[backend.x]\nagent = [\"{agent}\"]\npublic = true"),
                "unknown field",
            ),
            (
                format!("[backend.x]\nagents = [\"{agent}\"]\npublic = true\nmax_sessions = 0"),
                "max_sessions = 0",
            ),
            ("[backend.x\n".to_string(), "line 1"),
        ] {
            let e = parse(&text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
        }
        assert!(parse("").unwrap().is_empty());
    }

    #[test]
    fn the_example_file_parses() {
        let b = parse(include_str!("../../dist/credentials.toml")).unwrap();
        assert_eq!(b["intranet"].max_sessions, Some(500));
        assert_eq!(b["status-page"].clients, Clients::Public);
    }
}
