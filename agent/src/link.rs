//! One registered link to the relay and the sessions it serves. The link's frames travel over one
//! of three transports (see [`crate::transport`]): a stream (WebSocket or HTTP/2, in
//! [`crate::stream`]) that carries batches both ways, or the long-poll pair of a poll loop that
//! brings frames in and a push loop that sends them out ([`crate::longpoll`]). Every transport resends from the peer's last ack after a cut, so the
//! link survives broken connections and changes of transport without loss or duplication (see
//! `common::reliable`).

use crate::longpoll::{RETRY_INITIAL, RETRY_MAX};
use crate::transport::{Ended, Ladder, Next, Transport};
use crate::{Clients, Config};
use backhaul_common::api::{LinkInfo, OpenRequest, Opened};
use backhaul_common::api::{BACKEND_SECRET_HEADER, CLIENT_PATH_HEADER, FORWARDED_HEADERS};
use backhaul_common::backoff::Backoff;
use backhaul_common::dial::{dial, DialOptions, Dialed};
use backhaul_common::reliable::{Arrival, RecvState, Reorder, SendBuffer};
use backhaul_common::secret;
use backhaul_common::session::{
    new_session, pump, pump_peer, FrameSink, SessionHandle, SessionPeer, Summary, WsSide,
};
use backhaul_common::tcp_peer::tcp_peer;
use backhaul_common::wire::{BatchReader, Frame, Kind};
use backhaul_common::ws::Role;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

/// Extra time a poll may take beyond the relay's hold time before the agent gives up on it.
const POLL_GRACE: Duration = Duration::from_secs(10);
/// Longest a push may take.
const PUSH_TIMEOUT: Duration = Duration::from_secs(30);
/// The slowest a push body may cross, in bytes per second, before it is given up (1 Mbit/s;
/// on slower paths, pushes shrink until they fit).
const MIN_PUSH_RATE: usize = 128 * 1024;
/// Kept connections closed under a request after which polls and pushes stop keeping them.
const FRESH_AFTER_CLOSES: u32 = 3;
/// Longest the relay may take to accept a stream.
const STREAM_SETUP_TIMEOUT: Duration = Duration::from_secs(15);
/// Shortest limit [`within_relay_patience`] sets.
const MIN_LIMIT: Duration = Duration::from_millis(500);
/// The close reason (code 1014) a client gets when the agent could not reach the backend,
/// unless `--report-backend-errors` lets it say why.
pub const BACKEND_UNAVAILABLE: &str = "backend unavailable";

/// The close reason for a session whose backend could not be reached: the error itself only
/// when the operator allows it (`--report-backend-errors`), since it names hosts and ports of
/// the private network and tells open ports from closed ones.
pub fn backend_failure_reason(report: bool, error: &dyn std::fmt::Display) -> String {
    if report {
        format!("agent could not reach backend: {error:#}")
    } else {
        BACKEND_UNAVAILABLE.to_string()
    }
}

/// `limit`, cut to half the time the relay keeps a link without hearing from its agent
/// (`agent_timeout_ms`, 0 if the relay did not say), so that a request hanging on a dead
/// connection is abandoned and retried while the relay still holds the link and its sessions.
fn within_relay_patience(limit: Duration, agent_timeout_ms: u64) -> Duration {
    if agent_timeout_ms == 0 {
        return limit;
    }
    limit.min((Duration::from_millis(agent_timeout_ms) / 2).max(MIN_LIMIT))
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// State shared by the poll loop, the push loop and the sessions of one link.
pub struct Link {
    pub(crate) cfg: Arc<Config>,
    pub(crate) client: reqwest::Client,
    /// HTTP/1.1 client that opens a connection per request, used once the path has closed
    /// kept connections under us [`FRESH_AFTER_CLOSES`] times.
    pub(crate) client_fresh: reqwest::Client,
    pub(crate) closed_under_us: std::sync::atomic::AtomicU32,
    /// HTTP/2-only client for the http2 transport.
    pub(crate) client_h2: reqwest::Client,
    pub(crate) info: LinkInfo,
    pub(crate) url: String,
    pub(crate) out: Mutex<SendBuffer>,
    pub(crate) out_notify: Notify,
    /// The poll loop's receive position, sent as the ack in pushes too.
    pub(crate) down_ack: AtomicU64,
    /// The latest round of polls (see `Link::polls`).
    pub(crate) poll_round: AtomicU64,
    pub(crate) sessions: Mutex<HashMap<u32, Arc<SessionHandle>>>,
    /// Cancelled when the link is over (relay forgot it, or shutdown).
    pub(crate) done: CancellationToken,
    /// The transport that last carried the link.
    pub(crate) carrier: Mutex<Option<Transport>>,
    /// Batch sizes on streams, agent -> relay and relay -> agent. A batch counts only when
    /// whole, so a path that cuts connections after N bytes needs batches under N: each is
    /// halved after a break, and grows again with evidence that batches get through (acks for
    /// ours, see `StreamCursor`; whole batches received for the relay's, which it learns from the
    /// stream URL).
    pub(crate) up_batch: std::sync::atomic::AtomicUsize,
    pub(crate) down_batch: std::sync::atomic::AtomicUsize,
}

struct Sink(Arc<Link>);

impl FrameSink for Sink {
    fn send(&self, frame: Frame) {
        self.0.send(frame);
    }
}

impl Link {
    pub fn new(
        cfg: Arc<Config>,
        clients: &Clients,
        info: LinkInfo,
        shutdown: &CancellationToken,
    ) -> Arc<Self> {
        let url = format!(
            "{}{}/{}",
            cfg.relay_base(),
            backhaul_common::api::LINKS_PATH,
            info.link
        );
        let max_batch = info.max_batch_bytes as usize;
        Arc::new(Self {
            cfg,
            client: clients.h1.clone(),
            client_fresh: clients.h1_fresh.clone(),
            closed_under_us: std::sync::atomic::AtomicU32::new(0),
            client_h2: clients.h2.clone(),
            info,
            url,
            out: Mutex::new(SendBuffer::new()),
            out_notify: Notify::new(),
            down_ack: AtomicU64::new(0),
            poll_round: AtomicU64::new(0),
            sessions: Mutex::new(HashMap::new()),
            done: shutdown.child_token(),
            carrier: Mutex::new(None),
            up_batch: std::sync::atomic::AtomicUsize::new(max_batch),
            down_batch: std::sync::atomic::AtomicUsize::new(max_batch),
        })
    }

    pub(crate) fn send(&self, frame: Frame) {
        lock(&self.out).push(frame);
        self.out_notify.notify_one();
    }

    /// The HTTP/1.1 client for polls and pushes: the pooled one, until the path has shown that
    /// it closes connections after each answer (tinyproxy does, without saying
    /// `Connection: close`). Reusing such a connection loses the request sent on it just as
    /// the close arrives; a new connection per request never does.
    pub(crate) fn h1(&self) -> &reqwest::Client {
        if self.closed_under_us.load(Ordering::Relaxed) >= FRESH_AFTER_CLOSES {
            &self.client_fresh
        } else {
            &self.client
        }
    }

    /// Notes a request lost because its kept connection closed as it was sent.
    pub(crate) fn closed_under_us(&self, e: &reqwest::Error) {
        // hyper's words for a connection that closed before any answer (IncompleteMessage).
        if !describe(e).contains("connection closed before message completed") {
            return;
        }
        let n = self.closed_under_us.fetch_add(1, Ordering::Relaxed) + 1;
        if n == FRESH_AFTER_CLOSES {
            info!(
                "the path to the relay closed kept connections under {n} requests (a proxy without keep-alive?); opening a new connection for each request from now on"
            );
        }
    }

    pub(crate) fn request(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.cfg.agent_token {
            Some(t) => req.header(reqwest::header::AUTHORIZATION, secret::bearer(t)),
            None => req,
        }
    }

    /// Runs the link until the relay forgets it or shutdown; returns why it ended. Moves between
    /// transports as `--transport` allows: down the ladder when one is refused or keeps breaking,
    /// back to the top now and then.
    pub async fn run(self: Arc<Self>) -> String {
        let tracker = TaskTracker::new();
        let mut recv = RecvState::new();
        let mut ladder = Ladder::new(self.cfg.transport);
        let mut backoff = Backoff::new(RETRY_INITIAL, RETRY_MAX);
        let why = loop {
            let transport = ladder.current();
            let note = ladder.note();
            let spell = match transport {
                Transport::LongPoll => {
                    self.longpoll(&mut recv, &tracker, ladder.retry_faster_after(), &note)
                        .await
                }
                Transport::WebSocket | Transport::Http2 => {
                    self.stream(transport, &mut recv, &tracker, &note).await
                }
            };
            let ended = match spell {
                Spell::LinkGone(why) => break why,
                Spell::Shutdown => break "shutting down".to_string(),
                Spell::Ended(ended) => ended,
            };
            // What failed and why, for the log.
            let (what, why) = match &ended {
                Ended::Refused(why) => (format!("{transport} connection"), why.clone()),
                Ended::Broken { why, .. } => (format!("{transport} stream"), why.clone()),
                Ended::TryFaster => (String::new(), String::new()),
            };
            match ladder.ended(ended) {
                Next::BackToTop => info!("trying faster transports to the relay again"),
                Next::FallBack { warning, expected } => {
                    if expected {
                        info!("{warning}");
                    } else {
                        warn!("{warning}");
                    }
                    backoff.reset();
                }
                Next::Retry { reset_backoff } => {
                    if reset_backoff {
                        // It worked until it broke: reconnect at once.
                        backoff.reset();
                    }
                    if !self.pause_after_failure(&mut backoff, &what, &why).await {
                        break "shutting down".to_string();
                    }
                }
            }
        };
        self.done.cancel();
        let sessions: Vec<(u32, Arc<SessionHandle>)> = lock(&self.sessions).drain().collect();
        for (id, handle) in sessions {
            handle.terminate(Frame::close(id, 1001, "agent lost its link to the relay"));
        }
        tracker.close();
        if tokio::time::timeout(Duration::from_secs(5), tracker.wait())
            .await
            .is_err()
        {
            warn!("some sessions did not close within 5 s after the link ended");
        }
        why
    }

    /// Longest a stream may take to be set up.
    pub(crate) fn setup_limit(&self) -> Duration {
        within_relay_patience(STREAM_SETUP_TIMEOUT, self.info.agent_timeout_ms)
    }

    /// How long a push of `len` bytes may take: the relay may hold it for its turn up to the
    /// poll hold time, then its body must cross at no less than [`MIN_PUSH_RATE`]. A push that
    /// stalls on a dead connection is given up after that, and sent again.
    pub(crate) fn push_timeout(&self, len: usize) -> Duration {
        let hold = Duration::from_millis(self.info.poll_hold_ms);
        let transfer = Duration::from_secs_f64(len as f64 / MIN_PUSH_RATE as f64);
        (hold + self.grace() + transfer).min(PUSH_TIMEOUT)
    }

    /// How long past the relay's hold time a poll's answer, or the relay's heartbeat on a
    /// stream, may be late before the agent gives up on the connection and tries a new one.
    pub(crate) fn grace(&self) -> Duration {
        within_relay_patience(POLL_GRACE, self.info.agent_timeout_ms)
    }

    /// Hands on every whole frame `reader` holds, in order, dropping retransmitted ones. `Err`
    /// when the relay broke the protocol.
    pub(crate) fn take_frames(
        self: &Arc<Self>,
        reader: &mut BatchReader,
        recv: &mut RecvState,
        tracker: &TaskTracker,
    ) -> Result<(), String> {
        while let Some((seq, frame)) = reader
            .next_frame()
            .map_err(|e| format!("relay sent a bad batch: {e}"))?
        {
            match recv.arrive(seq) {
                Ok(Arrival::Deliver) => self.dispatch(frame, tracker),
                Ok(Arrival::Duplicate) => {}
                Err(e) => return Err(format!("relay broke the protocol: {e}")),
            }
        }
        Ok(())
    }

    /// Like [`Link::take_frames`], for batches that may arrive out of order (long-poll).
    pub(crate) fn take_frames_reordered(
        self: &Arc<Self>,
        reader: &mut BatchReader,
        reorder: &Mutex<Reorder>,
        tracker: &TaskTracker,
    ) -> Result<(), String> {
        while let Some((seq, frame)) = reader
            .next_frame()
            .map_err(|e| format!("relay sent a bad batch: {e}"))?
        {
            lock(reorder).arrive(seq, frame, |f| self.dispatch(f, tracker));
        }
        Ok(())
    }

    /// The transport carrying the link now, if any yet.
    pub fn carrier(&self) -> Option<Transport> {
        *lock(&self.carrier)
    }

    /// Says on stdout (for people and scripts) and in the log which transport carries the link,
    /// when it changes; reconnections on the same transport are only logged at debug level.
    pub(crate) fn announce_transport(&self, transport: Transport, note: &str) {
        let before = lock(&self.carrier).replace(transport);
        let changed = before != Some(transport);
        if changed {
            crate::metrics::metrics().transport(&self.cfg.backend_id, before, transport);
            backhaul_common::telemetry::announce(&format!(
                "backhaul-agent: link to the relay carried over {transport} ({note})"
            ));
            info!("link to the relay carried over {transport} ({note})");
        } else {
            debug!("link to the relay reconnected over {transport}");
        }
    }

    /// Tells the relay this link is going away (best effort, on shutdown).
    pub async fn deregister(&self) {
        let req = self.request(
            self.client
                .delete(&self.url)
                .timeout(Duration::from_secs(2)),
        );
        if let Err(e) = req.send().await {
            debug!("could not deregister from the relay: {e}");
        }
    }

    /// After a failed connection: the first retry goes at once (a proxy cutting a connection
    /// is routine), later ones wait with jittered backoff, until the instant returned.
    fn pause_after(&self, backoff: &mut Backoff, what: &str, why: &str) -> Option<Instant> {
        if backoff.attempts() == 0 {
            debug!("{what} failed ({why}); retrying at once");
            backoff.next_delay();
            return None;
        }
        let d = backoff.next_delay();
        warn!("{what} to relay failed ({why}); retrying in {d:?}");
        Some(Instant::now() + d)
    }

    /// After a failed connection: the first retry goes at once (a proxy cutting a connection
    /// is routine), later ones wait with jittered backoff. False if the link ended meanwhile.
    async fn pause_after_failure(&self, backoff: &mut Backoff, what: &str, why: &str) -> bool {
        let Some(until) = self.pause_after(backoff, what, why) else {
            return true;
        };
        tokio::select! {
            _ = tokio::time::sleep_until(until) => true,
            _ = self.done.cancelled() => false,
        }
    }

    /// Hands one in-order frame from the relay to its session, or opens a session.
    fn dispatch(self: &Arc<Self>, frame: Frame, tracker: &TaskTracker) {
        let id = frame.session;
        if frame.is_blocked() {
            crate::metrics::metrics().window_stalls.inc();
        }
        if frame.kind == Kind::Open {
            self.open(id, frame.payload, tracker);
            return;
        }
        let mut sessions = lock(&self.sessions);
        let Some(handle) = sessions.get(&id).cloned() else {
            return; // ended here first; late frames are dropped
        };
        // A CLOSE leaves the handle in place: the session lives on until its pump has finished
        // the close handshake (and takes window credit meanwhile).
        if let Err(v) = handle.deliver(frame) {
            warn!(session.id = id, "dropping session: relay {v}");
            handle.terminate(Frame::close(id, 1011, "relay broke flow control"));
            sessions.remove(&id);
            drop(sessions);
            self.send(Frame::abort(id, "flow control violated"));
        }
    }

    /// Carries a session straight to the TCP service of a `tcp://` backend, with the TCP
    /// convention (see `common::tcp_peer`).
    async fn carry_tcp(self: &Arc<Self>, id: u32, peer: SessionPeer) {
        let target = &self.cfg.backend;
        let host = match target.host() {
            Some(url::Host::Ipv6(a)) => a.to_string(),
            Some(h) => h.to_string(),
            None => String::new(),
        };
        let port = target.port().unwrap_or(0);
        let connect = tokio::net::TcpStream::connect((host.as_str(), port));
        let failed = match tokio::time::timeout(self.cfg.connect_timeout, connect).await {
            Ok(Ok(tcp)) => {
                let _ = tcp.set_nodelay(true);
                debug!("connected to {target}");
                let opened = serde_json::to_vec(&Opened { protocol: None }).unwrap_or_default();
                self.send(Frame::new(Kind::Opened, 0, id, Bytes::from(opened)));
                let (r, w) = tcp_peer(tcp);
                log_end(
                    &self.cfg.backend_id,
                    &pump_peer(r, w, peer, Arc::new(Sink(self.clone()))).await,
                );
                return;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {:?}", self.cfg.connect_timeout),
        };
        // The span names the session; the client's close reason may not.
        warn!("agent could not reach backend {target}: {failed}");
        let reason = backend_failure_reason(self.cfg.report_backend_errors, &failed);
        self.send(Frame::close(id, 1014, &reason));
    }

    fn open(self: &Arc<Self>, id: u32, payload: Bytes, tracker: &TaskTracker) {
        let open: OpenRequest = match serde_json::from_slice(&payload) {
            Ok(o) => o,
            Err(e) => {
                warn!(session.id = id, "relay sent an unreadable OPEN: {e}");
                self.send(Frame::close(
                    id,
                    1002,
                    "agent could not read the session request",
                ));
                return;
            }
        };
        let windows = backhaul_common::window::WindowConfig {
            initial: self.info.window,
            max: self.info.max_window.max(self.info.window),
            budget: self.cfg.window_budget.clone(),
        };
        let (handle, peer) = new_session(id, &windows);
        {
            let mut sessions = lock(&self.sessions);
            if sessions.len() >= self.cfg.max_sessions {
                drop(sessions);
                warn!(
                    session.id = id,
                    "refusing session: at the limit of {} (--max-sessions)", self.cfg.max_sessions
                );
                self.send(Frame::close(id, 1013, "agent is at its session limit"));
                return;
            }
            if sessions.contains_key(&id) {
                warn!(
                    session.id = id,
                    "relay reused a live session id; ignoring the OPEN"
                );
                return;
            }
            sessions.insert(id, Arc::new(handle));
        }
        let link = self.clone();
        let span = tracing::info_span!(
            "session",
            session.id = id,
            client.addr = open.client_addr.as_deref().unwrap_or("-")
        );
        tracker.spawn(
            async move {
                let _counted = crate::metrics::metrics().session(&link.cfg.backend_id);
                if link.cfg.backend.scheme() == "tcp" {
                    link.carry_tcp(id, peer).await;
                    lock(&link.sessions).remove(&id);
                    return;
                }
                let url = match backhaul_common::api::backend_url(&link.cfg.backend, &open.path) {
                    Ok(u) => u,
                    Err(e) => {
                        warn!("refusing a session for a path outside --backend: {e}");
                        link.send(Frame::close(
                            id,
                            1008,
                            &format!("agent refused the session: {e}"),
                        ));
                        lock(&link.sessions).remove(&id);
                        return;
                    }
                };
                let mut headers = forwardable(open.headers);
                // What the client added to the path (maybe nothing), so that a backend with
                // --routes routes on the rest.
                let own = link.cfg.backend.path().trim_end_matches('/').len();
                let added = url.path().get(own..).unwrap_or_default();
                headers.push((CLIENT_PATH_HEADER.to_string(), added.to_string()));
                if let Some(s) = &link.cfg.backend_secret {
                    headers.push((BACKEND_SECRET_HEADER.to_string(), s.expose().to_string()));
                }
                let dial_opts = DialOptions {
                    timeout: link.cfg.connect_timeout,
                    tls: link.cfg.tls.clone(),
                    protocols: open.protocols.clone(),
                    // HTTP(S)_PROXY is for reaching the relay; the backend is local.
                    use_env_proxy: false,
                    headers,
                };
                match dial(&url, &dial_opts).await {
                    Ok(Dialed { io, protocol }) => {
                        debug!("connected to backend {url}");
                        let opened = serde_json::to_vec(&Opened { protocol }).unwrap_or_default();
                        link.send(Frame::new(Kind::Opened, 0, id, Bytes::from(opened)));
                        let side = WsSide {
                            role: Role::Client,
                            max_message: link.cfg.max_message,
                        };
                        log_end(
                            &link.cfg.backend_id,
                            &pump(io, side, peer, Arc::new(Sink(link.clone()))).await,
                        );
                    }
                    Err(e) => {
                        // The span names the session; the client's close reason may not.
                        warn!("agent could not reach backend {url}: {e:#}");
                        let reason = backend_failure_reason(link.cfg.report_backend_errors, &e);
                        link.send(Frame::close(id, 1014, &reason));
                    }
                }
                lock(&link.sessions).remove(&id);
            }
            .instrument(span),
        );
    }
}

pub(crate) type RelayStream = backhaul_common::dial::WsIo;

/// The session's last log line: how it ended and what it carried.
fn log_end(backend: &str, summary: &Summary) {
    crate::metrics::metrics().session_ended(backend, summary.received, summary.sent);
    info!(
        bytes.to_backend = summary.received,
        bytes.from_backend = summary.sent,
        "session ended: {}",
        summary.ending
    );
}

/// The relay's OPEN headers that the agent passes on: only [`FORWARDED_HEADERS`], whatever the
/// relay sent. So a client can never supply [`BACKEND_SECRET_HEADER`], which is not among them.
fn forwardable(headers: Vec<(String, String)>) -> Vec<(String, String)> {
    headers
        .into_iter()
        .filter(|(name, _)| {
            let ok = FORWARDED_HEADERS.contains(&name.to_ascii_lowercase().as_str());
            if !ok {
                debug!("not passing header {name:?} from the relay to the backend");
            }
            ok
        })
        .collect()
}

/// How a spell on one transport ended.
pub(crate) enum Spell {
    /// The link is over: the relay forgot it, or broke the protocol. Register again.
    LinkGone(String),
    Shutdown,
    /// The transport ended and the link goes on, on this one or another (see [`Ladder`]).
    Ended(Ended),
}

impl Spell {
    pub(crate) fn refused(why: String) -> Self {
        Spell::Ended(Ended::Refused(why))
    }
}

pub(crate) const LINK_GONE: &str =
    "the relay no longer knows this link (it restarted, or gave up on this agent)";

/// Whether an exchange broke on a connection that had been made (reset or closed half-way, as
/// proxies and NATs do), rather than failing to connect or timing out.
pub(crate) fn cut_mid_way(e: &reqwest::Error) -> bool {
    !e.is_connect() && !e.is_timeout() && (e.is_request() || e.is_body())
}

/// Completes at `at`, or never.
pub(crate) async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Whether the relay answered that it no longer knows the link.
pub(crate) fn link_gone(resp: &reqwest::Response) -> bool {
    resp.status() == reqwest::StatusCode::NOT_FOUND
}

/// Error text with its causes, which reqwest otherwise hides.
pub use backhaul_common::describe_error as describe;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_errors_reach_clients_only_when_allowed() {
        let e = "could not connect to 10.1.2.3:5432: Connection refused (os error 111)";
        assert_eq!(backend_failure_reason(false, &e), "backend unavailable");
        assert_eq!(
            backend_failure_reason(true, &e),
            format!("agent could not reach backend: {e}")
        );
    }

    #[test]
    fn only_forwarded_headers_pass_never_the_backend_secret() {
        let from_relay = vec![
            ("origin".to_string(), "https://app.example".to_string()),
            ("X-Backhaul-Secret".to_string(), "forged".to_string()),
            ("x-backhaul-secret".to_string(), "forged".to_string()),
            ("x-private".to_string(), "no".to_string()),
        ];
        assert_eq!(
            forwardable(from_relay),
            vec![("origin".to_string(), "https://app.example".to_string())]
        );
    }

    #[test]
    fn limits_stay_within_the_relays_patience() {
        // The default relay keeps a quiet link for 5 s: give up on a hung request after 2.5 s.
        assert_eq!(
            within_relay_patience(STREAM_SETUP_TIMEOUT, 5000),
            Duration::from_millis(2500)
        );
        // A patient relay does not stretch the agent's own limit.
        assert_eq!(
            within_relay_patience(STREAM_SETUP_TIMEOUT, 600_000),
            STREAM_SETUP_TIMEOUT
        );
        // An impatient one does not cut it below what a handshake needs.
        assert_eq!(within_relay_patience(POLL_GRACE, 200), MIN_LIMIT);
        // A relay that does not say keeps the agent's limits.
        assert_eq!(within_relay_patience(POLL_GRACE, 0), POLL_GRACE);
    }
}
