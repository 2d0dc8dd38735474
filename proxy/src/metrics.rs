//! What the relay counts, for operators: `/metrics` (Prometheus text format, written by
//! prometheus-client) and the `/status` page, both behind the admin credential (see
//! [`crate::http`]). Counters are bumped where things happen; gauges (links, open sessions)
//! are read from the hub when scraped, so they cannot drift.
//!
//! Label values: `backend` is a backend ID that had an agent registered (so a client cannot
//! create series by asking for made-up IDs); after [`MAX_BACKEND_SERIES`] distinct IDs, further
//! ones are counted under `_other`. `reason` and `transport` come from fixed sets.

use backhaul_common::metrics::{encode, exchanges, registered, Exchanges};
pub use backhaul_common::metrics::{BackendLabel, BytesLabels, LinkLabels};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::SystemTime;

/// Distinct backend IDs that get series of their own.
pub const MAX_BACKEND_SERIES: usize = 1000;
/// Refusals kept for the status page, per reason: a flood of one kind (scanners, a connection
/// flood) cannot push the others out.
pub const RECENT_REFUSALS: usize = 5;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChangeLabels {
    pub from: &'static str,
    pub to: &'static str,
}

/// Why something was refused: the `reason` label of `backhaul_relay_refusals_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// A client without a valid client credential.
    ClientCredential,
    /// An agent without a valid agent credential.
    AgentCredential,
    /// A session for a backend with no agent.
    NoAgent,
    /// A session over the relay's, a backend's or a client's share.
    SessionLimit,
    /// Too many sessions waiting for the backend's agents.
    PendingFull,
    /// A connection over `--max-connections` or the per-client share.
    ConnectionLimit,
    /// An exposed port's client outside the agent's allowlist.
    ExposeAllowlist,
    /// An agent's request for an exposed port that could not be granted.
    ExposeRequest,
    /// `/metrics` or `/status` without the admin credential.
    Admin,
}

impl Refused {
    pub fn label(self) -> &'static str {
        match self {
            Refused::ClientCredential => "client_credential",
            Refused::AgentCredential => "agent_credential",
            Refused::NoAgent => "no_agent",
            Refused::SessionLimit => "session_limit",
            Refused::PendingFull => "pending_full",
            Refused::ConnectionLimit => "connection_limit",
            Refused::ExposeAllowlist => "expose_allowlist",
            Refused::ExposeRequest => "expose_request",
            Refused::Admin => "admin_credential",
        }
    }
}

/// One refusal as the status page lists it.
#[derive(Clone, Debug)]
pub struct RecentRefusal {
    pub at: SystemTime,
    pub reason: &'static str,
    pub detail: String,
}

/// The relay's counters and the registry that writes them out.
pub struct Metrics {
    registry: Registry,
    pub links: Family<LinkLabels, Gauge>,
    pub sessions_open: Family<BackendLabel, Gauge>,
    pub sessions_pending: Family<BackendLabel, Gauge>,
    pub sessions_opened: Family<BackendLabel, Counter>,
    pub session_bytes: Family<BytesLabels, Counter>,
    pub registrations: Family<BackendLabel, Counter>,
    pub refusals: Family<ReasonLabel, Counter>,
    pub transport_changes: Family<ChangeLabels, Counter>,
    pub exchange_seconds: Exchanges,
    pub frames_resent: Counter,
    pub window_stalls: Counter,
    backends: Mutex<HashSet<String>>,
    recent: Mutex<HashMap<&'static str, VecDeque<RecentRefusal>>>,
    /// Held while a scrape sets the gauges and encodes, so two scrapes cannot interleave.
    pub scrape: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("backhaul_relay");
        let r = &mut registry;
        Self {
            links: registered(
                r,
                "agent_links",
                "Agent links registered now, by backend and the transport they last used",
                Default::default(),
            ),
            sessions_open: registered(
                r,
                "sessions_open",
                "Sessions held now (bound to an agent or waiting for one)",
                Default::default(),
            ),
            sessions_pending: registered(
                r,
                "sessions_pending",
                "Sessions waiting for an agent to take them",
                Default::default(),
            ),
            sessions_opened: registered(
                r,
                "sessions_opened",
                "Sessions opened (frontends' WebSockets and exposed ports' clients)",
                Default::default(),
            ),
            session_bytes: registered(
                r,
                "session_bytes",
                "Payload bytes of ended sessions, by direction",
                Default::default(),
            ),
            registrations: registered(
                r,
                "agent_registrations",
                "Agent registrations accepted",
                Default::default(),
            ),
            refusals: registered(
                r,
                "refusals",
                "Requests and connections refused, by reason",
                Default::default(),
            ),
            transport_changes: registered(
                r,
                "transport_changes",
                "Agent links that moved from one transport to another (fallbacks and upgrades)",
                Default::default(),
            ),
            exchange_seconds: registered(
                r,
                "longpoll_exchange_seconds",
                "How long long-poll requests took to answer (polls include their hold)",
                exchanges(),
            ),
            frames_resent: registered(
                r,
                "frames_resent",
                "Frames sent to agents again, after a lost poll or a broken stream",
                Default::default(),
            ),
            window_stalls: registered(
                r,
                "window_stalls",
                "Frames whose sender said it was held back by the session's window",
                Default::default(),
            ),
            registry,
            backends: Mutex::new(HashSet::new()),
            recent: Mutex::new(HashMap::new()),
            scrape: Mutex::new(()),
        }
    }

    /// The label for `backend`: its ID once an agent registered for it, within the cap.
    pub fn backend(&self, backend: &str) -> BackendLabel {
        let mut seen = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        let known = seen.contains(backend);
        let backend = if known || seen.len() < MAX_BACKEND_SERIES {
            if !known {
                seen.insert(backend.to_string());
            }
            backend.to_string()
        } else {
            "_other".to_string()
        };
        BackendLabel { backend }
    }

    /// Counts a refusal and keeps it for the status page.
    pub fn refused(&self, why: Refused, detail: impl FnOnce() -> String) {
        self.refusals
            .get_or_create(&ReasonLabel {
                reason: why.label(),
            })
            .inc();
        let entry = RecentRefusal {
            at: SystemTime::now(),
            reason: why.label(),
            detail: detail(),
        };
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let ring = recent.entry(why.label()).or_default();
        if ring.len() == RECENT_REFUSALS {
            ring.pop_front();
        }
        ring.push_back(entry);
    }

    /// The latest refusals of every reason, newest first.
    pub fn recent_refusals(&self) -> Vec<RecentRefusal> {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<RecentRefusal> = recent.values().flatten().cloned().collect();
        all.sort_by_key(|r| std::cmp::Reverse(r.at));
        all
    }

    /// Counts an ended session's bytes.
    pub fn session_ended(&self, backend: &str, to_backend: u64, to_client: u64) {
        let backend = self.backend(backend).backend;
        for (direction, n) in [("to_backend", to_backend), ("to_client", to_client)] {
            self.session_bytes
                .get_or_create(&BytesLabels {
                    backend: backend.clone(),
                    direction,
                })
                .inc_by(n);
        }
    }

    /// Writes everything in the Prometheus/OpenMetrics text format.
    pub fn encode(&self) -> String {
        encode(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_series_are_capped() {
        let m = Metrics::new();
        for i in 0..MAX_BACKEND_SERIES {
            assert_eq!(m.backend(&format!("b{i}")).backend, format!("b{i}"));
        }
        assert_eq!(m.backend("one-too-many").backend, "_other");
        assert_eq!(m.backend("b7").backend, "b7");
    }

    #[test]
    fn refusals_are_counted_and_the_latest_kept() {
        let m = Metrics::new();
        m.refused(Refused::ClientCredential, || "the one that matters".into());
        for i in 0..(RECENT_REFUSALS + 5) {
            m.refused(Refused::NoAgent, || format!("n{i}"));
        }
        let recent = m.recent_refusals();
        assert_eq!(
            recent.len(),
            RECENT_REFUSALS + 1,
            "a flood of one reason pushes out no other"
        );
        assert!(recent.iter().any(|r| r.detail == "the one that matters"));
        assert!(recent
            .iter()
            .any(|r| r.detail == format!("n{}", RECENT_REFUSALS + 4)));
        let text = m.encode();
        assert!(
            text.contains(&format!(
                "backhaul_relay_refusals_total{{reason=\"no_agent\"}} {}",
                RECENT_REFUSALS + 5
            )),
            "{text}"
        );
    }
}
