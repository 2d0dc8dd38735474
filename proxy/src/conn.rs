//! What keeps strangers' connections from holding the relay: a cap on connections in all and
//! per client address, a deadline for the first complete request (TLS handshake and protocol
//! sniff included), and an idle timeout between requests. Agents and sessions are unaffected:
//! a held long-poll, a streaming link or an upgraded WebSocket counts as a request in flight.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// Connection limits and deadlines (the relay's `--max-connections*` and `--*-timeout-secs`).
#[derive(Debug, Clone)]
pub struct ConnConfig {
    pub max_connections: usize,
    pub max_connections_per_client: usize,
    /// From accept to the first request's headers, TLS handshake included.
    pub first_request_timeout: Duration,
    /// With no request in flight, how long a connection may stay open.
    pub idle_timeout: Duration,
}

/// Why a connection was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnRefusal {
    Total(usize),
    PerClient(usize),
}

impl std::fmt::Display for ConnRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnRefusal::Total(n) => write!(
                f,
                "the relay holds its limit of {n} connections (--max-connections)"
            ),
            ConnRefusal::PerClient(n) => write!(
                f,
                "this address already holds {n} connections (--max-connections-per-client)"
            ),
        }
    }
}

/// The address a client's connections and sessions are counted under: its IPv4 address, or its
/// IPv6 /64 (one subscriber usually holds a whole /64, so per-address caps on single IPv6
/// addresses would cap nothing).
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut seg = v6.segments();
                seg[4..].fill(0);
                IpAddr::V6(seg.into())
            }
        },
    }
}

/// Counts open connections, in all and per client address ([`client_key`]).
pub struct ConnLimits {
    cfg: ConnConfig,
    state: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One admitted connection; dropping it gives the slot back.
pub struct ConnSlot {
    limits: Arc<ConnLimits>,
    ip: IpAddr,
}

impl ConnLimits {
    pub fn new(cfg: ConnConfig) -> Arc<Self> {
        Arc::new(Self {
            cfg,
            state: Mutex::new((0, HashMap::new())),
        })
    }

    pub fn config(&self) -> &ConnConfig {
        &self.cfg
    }

    /// Takes a slot for a connection from `ip`, or says which limit is full.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnSlot, ConnRefusal> {
        let ip = client_key(ip);
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (total, per_ip) = &mut *st;
        if *total >= self.cfg.max_connections {
            return Err(ConnRefusal::Total(self.cfg.max_connections));
        }
        let mine = per_ip.entry(ip).or_insert(0);
        if *mine >= self.cfg.max_connections_per_client {
            return Err(ConnRefusal::PerClient(self.cfg.max_connections_per_client));
        }
        *mine += 1;
        *total += 1;
        Ok(ConnSlot {
            limits: self.clone(),
            ip,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut st = self.limits.state.lock().unwrap_or_else(|e| e.into_inner());
        let (total, per_ip) = &mut *st;
        *total = total.saturating_sub(1);
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

/// Requests in flight on one connection, watched by [`Activity::until_idle`].
#[derive(Clone)]
pub struct Activity {
    tx: Arc<watch::Sender<(usize, bool)>>,
}

/// Held while a request (and its response body, and any upgraded socket) is being served.
pub struct Busy(Activity);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.tx.send_modify(|(n, _)| *n -= 1);
    }
}

/// Why a connection is being closed by its watchdog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quiet {
    /// No request arrived in time after the connection was accepted.
    NoFirstRequest,
    /// No request was in flight for the idle timeout.
    Idle,
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

impl Activity {
    pub fn new() -> Self {
        Self {
            tx: Arc::new(watch::channel((0, false)).0),
        }
    }

    /// Marks a request in flight until the returned guard is dropped.
    pub fn busy(&self) -> Busy {
        self.tx.send_modify(|(n, seen)| {
            *n += 1;
            *seen = true;
        });
        Busy(self.clone())
    }

    /// Completes when the connection should be closed: no first request within `first`, or no
    /// request in flight for `idle`. Never completes while a request is in flight.
    pub async fn until_idle(&self, first: Duration, idle: Duration) -> Quiet {
        let mut rx = self.tx.subscribe();
        let first_deadline = tokio::time::Instant::now() + first;
        loop {
            let (n, seen) = *rx.borrow_and_update();
            if n > 0 {
                if rx.changed().await.is_err() {
                    return Quiet::Idle;
                }
                continue;
            }
            let (deadline, why) = if seen {
                (tokio::time::Instant::now() + idle, Quiet::Idle)
            } else {
                (first_deadline, Quiet::NoFirstRequest)
            };
            tokio::select! {
                r = rx.changed() => if r.is_err() { return why },
                _ = tokio::time::sleep_until(deadline) => return why,
            }
        }
    }
}

/// Raises the open-files soft limit to the hard limit and returns it, so that the connection
/// caps, not the kernel, decide when to refuse.
pub fn raise_open_files_limit() -> std::io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: usize, per: usize) -> Arc<ConnLimits> {
        ConnLimits::new(ConnConfig {
            max_connections: total,
            max_connections_per_client: per,
            first_request_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
        })
    }

    #[test]
    fn caps_per_client_and_in_all() {
        let l = limits(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = l.admit(a).unwrap();
        let _a2 = l.admit(a).unwrap();
        assert_eq!(l.admit(a).err(), Some(ConnRefusal::PerClient(2)));
        let _b1 = l.admit(b).unwrap();
        assert_eq!(l.admit(b).err(), Some(ConnRefusal::Total(3)));
        drop(a1);
        assert_eq!(l.open(), 2);
        let _a3 = l.admit(a).unwrap();
    }

    #[test]
    fn ipv6_clients_count_per_64() {
        let key = |s: &str| client_key(s.parse().unwrap());
        assert_eq!(key("2001:db8:1:2:a:b:c:d"), key("2001:db8:1:2::1"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::ffff:10.0.0.1"), key("10.0.0.1"));
        assert_ne!(key("10.0.0.1"), key("10.0.0.2"));
    }

    #[tokio::test(start_paused = true)]
    async fn watchdog_waits_for_the_first_request_then_for_idleness() {
        let act = Activity::new();
        let start = tokio::time::Instant::now();
        let quiet = act
            .until_idle(Duration::from_secs(10), Duration::from_secs(60))
            .await;
        assert_eq!(quiet, Quiet::NoFirstRequest);
        assert_eq!(start.elapsed(), Duration::from_secs(10));

        let act = Activity::new();
        let busy = act.busy();
        let watcher = tokio::spawn({
            let act = act.clone();
            async move {
                act.until_idle(Duration::from_secs(10), Duration::from_secs(60))
                    .await
            }
        });
        // A request held for longer than both timeouts keeps the connection.
        tokio::time::sleep(Duration::from_secs(300)).await;
        assert!(!watcher.is_finished());
        drop(busy);
        let start = tokio::time::Instant::now();
        assert_eq!(watcher.await.unwrap(), Quiet::Idle);
        assert_eq!(start.elapsed(), Duration::from_secs(60));
    }
}
