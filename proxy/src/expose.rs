//! Exposed ports: a backend reached by plain TCP clients on a public port of the relay, with no
//! frontend (as bore, frp and rathole expose a port). An agent asks for it when it registers
//! (`Hello::expose`); the relay gives a port of its `--expose-ports` range (or the one asked
//! for), accepts TCP connections on it and opens a session for each, carried over the
//! backend's links like any other, with the TCP convention at the relay's end
//! (`common::tcp_peer`). The port stays with the backend while any of its agents is connected
//! and for `--expose-grace-secs` after the last one left, so a restarted agent gets the same
//! port back and clients keep their address.

use crate::http::Ctx;
use backhaul_common::api::{parse_allow, ExposeRequest, Exposed, OpenRequest};
use backhaul_common::session::pump_peer;
use backhaul_common::tcp_peer::tcp_peer;
use ipnet::IpNet;
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, Instrument};

/// How often an exposed port checks whether its backend still has an agent.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Where and how the relay exposes ports.
#[derive(Debug, Clone)]
pub struct ExposeConfig {
    /// Ports agents may be given.
    pub ports: RangeInclusive<u16>,
    /// The address exposed ports listen on (the relay's own).
    pub ip: IpAddr,
    /// How long a port stays with a backend that has no agent.
    pub grace: Duration,
}

/// Why a port could not be exposed; the agent's registration is refused with the text.
#[derive(Debug, thiserror::Error)]
pub enum ExposeError {
    #[error("this relay exposes no ports (start it with --expose-ports FIRST-LAST)")]
    NotOffered,
    #[error("port {0} is outside this relay's --expose-ports {1}-{2}")]
    OutOfRange(u16, u16, u16),
    #[error("backend '{0}' is already exposed at port {1}; ask for that one or for any")]
    OtherPort(String, u16),
    #[error("port {0} is taken")]
    Taken(u16),
    #[error("every port of --expose-ports {0}-{1} is taken")]
    Exhausted(u16, u16),
    #[error("bad allowlist: {0}")]
    BadAllowlist(String),
}

/// One exposed port.
struct Exposure {
    exposed: Exposed,
    /// When an agent last asked for it: it is not released within the grace period after.
    claimed: tokio::time::Instant,
    /// Client addresses it admits; empty: any. The latest registration of the backend's agents
    /// sets it.
    allow: Vec<IpNet>,
    task: AbortHandle,
}

/// The ports exposed now, by backend.
pub struct Exposer {
    cfg: ExposeConfig,
    ports: Mutex<HashMap<String, Exposure>>,
    /// Cancelled when the relay shuts down: every port closes.
    shutdown: CancellationToken,
}

impl Exposer {
    pub fn new(cfg: ExposeConfig, shutdown: CancellationToken) -> Arc<Self> {
        Arc::new(Self {
            cfg,
            ports: Mutex::new(HashMap::new()),
            shutdown,
        })
    }

    /// An agent of `backend` registered without asking for a port: the latest registration
    /// decides, so the port closes (an operator withdraws a port by restarting its agent
    /// without --expose).
    pub fn withdraw(&self, backend: &str) {
        let mut ports = self.ports.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = ports.remove(backend) {
            e.task.abort();
            info!(backend.id = backend, "closed the exposed port {} of backend '{backend}': an agent registered without asking for it", e.exposed.port);
        }
    }

    /// The port of `backend`: the one it has, or a new one (`req.port`, or any free one),
    /// admitting the clients `req.allow` lists.
    pub fn expose(
        self: &Arc<Self>,
        ctx: &Arc<Ctx>,
        backend: &str,
        req: &ExposeRequest,
    ) -> Result<Exposed, ExposeError> {
        let allow = parse_allow(&req.allow).map_err(ExposeError::BadAllowlist)?;
        let want = req.port;
        let mut ports = self.ports.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = ports.get_mut(backend) {
            return match want {
                Some(p) if p != e.exposed.port => {
                    Err(ExposeError::OtherPort(backend.to_string(), e.exposed.port))
                }
                _ => {
                    e.allow = allow;
                    e.claimed = tokio::time::Instant::now();
                    Ok(e.exposed.clone())
                }
            };
        }
        let (first, last) = (*self.cfg.ports.start(), *self.cfg.ports.end());
        let candidates = match want {
            Some(p) if !self.cfg.ports.contains(&p) => {
                return Err(ExposeError::OutOfRange(p, first, last))
            }
            Some(p) => p..=p,
            None => self.cfg.ports.clone(),
        };
        let in_use: HashSet<u16> = ports.values().map(|e| e.exposed.port).collect();
        let mut bound = None;
        for port in candidates.filter(|p| !in_use.contains(p)) {
            // Bound here, under the lock, so two agents cannot be given one port.
            if let Ok(l) = std::net::TcpListener::bind(SocketAddr::new(self.cfg.ip, port)) {
                if l.set_nonblocking(true).is_ok() {
                    if let Ok(l) = TcpListener::from_std(l) {
                        bound = Some((port, l));
                        break;
                    }
                }
            }
        }
        let Some((port, listener)) = bound else {
            return Err(match want {
                Some(p) => ExposeError::Taken(p),
                None => ExposeError::Exhausted(first, last),
            });
        };
        let exposed = Exposed {
            port,
            tunnel: uuid::Uuid::new_v4().to_string(),
        };
        let span = tracing::info_span!("exposed", backend.id = backend, port);
        let task = tokio::spawn(
            serve_port(self.clone(), ctx.clone(), backend.to_string(), listener).instrument(span),
        )
        .abort_handle();
        info!(backend.id = backend, tunnel = %exposed.tunnel, "exposing backend '{backend}' on port {port}");
        ports.insert(
            backend.to_string(),
            Exposure {
                exposed: exposed.clone(),
                claimed: tokio::time::Instant::now(),
                allow,
                task,
            },
        );
        Ok(exposed)
    }

    /// Whether `backend`'s port admits a client at `ip`.
    fn admits(&self, backend: &str, ip: IpAddr) -> bool {
        let ports = self.ports.lock().unwrap_or_else(|e| e.into_inner());
        let ip = ip.to_canonical();
        ports
            .get(backend)
            .is_some_and(|e| e.allow.is_empty() || e.allow.iter().any(|n| n.contains(&ip)))
    }

    /// Releases `backend`'s port if no agent has asked for it within the grace period and none
    /// serves the backend now; both are checked under the lock `expose` takes, so an agent
    /// told the port a moment ago never finds it gone. True when released.
    fn release_if_abandoned(&self, backend: &str, hub: &crate::hub::Hub) -> bool {
        let mut ports = self.ports.lock().unwrap_or_else(|e| e.into_inner());
        let abandoned = ports
            .get(backend)
            .is_some_and(|e| e.claimed.elapsed() >= self.cfg.grace && !hub.has_agent(backend));
        if abandoned {
            ports.remove(backend);
        }
        abandoned
    }
}

/// Accepts the clients of `backend`'s exposed port until the backend has had no agent for the
/// grace period.
async fn serve_port(exposer: Arc<Exposer>, ctx: Arc<Ctx>, backend: String, listener: TcpListener) {
    let mut check =
        tokio::time::interval_at(tokio::time::Instant::now() + CHECK_EVERY, CHECK_EVERY);
    let mut alone_since: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = exposer.shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) if !exposer.admits(&backend, peer.ip()) => {
                    drop(tcp);
                    let line = format!("refused a client of backend '{backend}' from {peer}: not in the exposed port's allowlist");
                    ctx.refuse(crate::metrics::Refused::ExposeAllowlist, line);
                }
                Ok((tcp, peer)) => {
                    let span = tracing::info_span!("session", backend.id = %backend, client.addr = %peer);
                    ctx.sessions.spawn(exposed_session(ctx.clone(), backend.clone(), tcp, peer).instrument(span));
                }
                Err(e) => {
                    // Out of descriptors, most likely: wait rather than spin.
                    ctx.auth.log_refusal(|| format!("could not accept a client of backend '{backend}': {e}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = check.tick() => {
                if ctx.hub.has_agent(&backend) {
                    alone_since = None;
                } else if alone_since.get_or_insert_with(tokio::time::Instant::now).elapsed() >= exposer.cfg.grace
                    && exposer.release_if_abandoned(&backend, &ctx.hub)
                {
                    info!("releasing the port: backend '{backend}' has had no agent for {:?}", exposer.cfg.grace);
                    return;
                }
            }
        }
    }
}

/// One client of an exposed port: a session of `backend`, the TCP connection as its peer.
async fn exposed_session(ctx: Arc<Ctx>, backend: String, tcp: TcpStream, peer: SocketAddr) {
    let _ = tcp.set_nodelay(true);
    let open = OpenRequest {
        client_addr: Some(peer.to_string()),
        ..OpenRequest::default()
    };
    let cap = ctx.auth.policy().max_sessions(&backend);
    let (session, session_peer, _) =
        match ctx
            .hub
            .open_session(&backend, &open, crate::conn::client_key(peer.ip()), cap)
        {
            Ok(s) => s,
            Err(e) => {
                // The client's connection closes: it has no other way to hear why.
                ctx.auth.log_refusal(|| {
                    format!("refused a client of backend '{backend}' from {peer}: {e}")
                });
                return;
            }
        };
    let (r, w) = tcp_peer(tcp);
    let pumped = pump_peer(r, w, session_peer, session.clone());
    crate::http::carry_session(&ctx.hub, session, pumped).await;
}

/// Parses `--expose-ports`: `FIRST-LAST` or one port.
pub fn parse_ports(s: &str) -> Result<RangeInclusive<u16>, String> {
    let bad = || format!("{s:?} is not a port range; write FIRST-LAST, e.g. 40000-40100");
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let a: u16 = a.trim().parse().map_err(|_| bad())?;
    let b: u16 = b.trim().parse().map_err(|_| bad())?;
    if a == 0 || a > b {
        return Err(bad());
    }
    Ok(a..=b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_parse_or_say_why_not() {
        assert_eq!(parse_ports("40000-40100"), Ok(40000..=40100));
        assert_eq!(parse_ports("7000"), Ok(7000..=7000));
        for bad in ["", "0-10", "10-5", "a-b", "70000", "1-2-3"] {
            assert!(parse_ports(bad).is_err(), "{bad}");
        }
    }
}
