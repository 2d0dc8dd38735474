//! The relay's state: which agents (links) serve which backend, the sessions waiting for an agent,
//! and each link's reliable frame streams. HTTP handlers call into this; it does no IO itself
//! apart from waking waiting polls.
//!
//! Lock order: the hub's lock, then a session's state lock, then a link's state lock. A lock may be
//! taken while holding one earlier in that order, never one later than it.

use crate::metrics::{Metrics, Refused};
use backhaul_common::api::{LinkInfo, OpenRequest};
use backhaul_common::reliable::{Arrival, RecvState, SendBuffer, StreamCursor, StreamNext};
use backhaul_common::secret::SecretHash;
use backhaul_common::session::{new_session, FrameSink, SessionHandle, SessionPeer};
pub use backhaul_common::transport::Transport;
use backhaul_common::window::{Budget, WindowConfig};
use backhaul_common::wire::{Batch, BatchEncoder, BatchHeader, BatchReader, Frame, Kind};
use bytes::Bytes;
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

/// Sessions handed to one poll at most; the rest go to the next poll or another agent.
const MAX_CLAIM_PER_POLL: usize = 64;

/// Tunables of the hub, from the relay's configuration.
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub poll_hold: Duration,
    pub agent_timeout: Duration,
    pub open_timeout: Duration,
    /// Every session's window, each way, when it starts.
    pub window: u32,
    /// How far a session's window may grow while its sender is held back by it.
    pub max_window: u32,
    /// Bytes of window growth all sessions together may be granted.
    pub window_budget: usize,
    pub max_batch_bytes: usize,
    pub max_sessions: usize,
    /// Sessions one backend may hold at once, unless its credentials say otherwise.
    pub max_sessions_per_backend: usize,
    /// Sessions one client address may hold at once.
    pub max_sessions_per_client: usize,
    pub max_pending_per_backend: usize,
    /// Largest data message a client may send; a larger one is refused with close code 1009.
    pub max_message: u64,
}

/// Why the hub refused something; the HTTP layer turns these into statuses.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("no agent is connected for backend '{0}'; start backhaul-agent with --backend-id {0} (or check that it can reach this relay)")]
    NoAgent(String),
    #[error("backend '{0}' already has {1} sessions waiting for an agent; the agents are not keeping up or are stuck")]
    PendingFull(String, usize),
    #[error("the relay is at its limit of {0} sessions; raise --max-sessions or add relays")]
    TooManySessions(usize),
    #[error("backend '{0}' is at its limit of {1} sessions (--max-sessions-per-backend, or max_sessions in the credentials file)")]
    BackendFull(String, usize),
    #[error("this client address already holds {0} sessions (--max-sessions-per-client)")]
    ClientFull(usize),
    #[error("unknown or expired link '{0}'; the agent must register again")]
    UnknownLink(String),
    #[error("a request for link '{0}' did not carry the credential the link was registered with")]
    WrongCredential(String),
    #[error("protocol error from agent on link '{link}': {what}")]
    Protocol { link: String, what: String },
}

/// Everything the relay knows.
pub struct Hub {
    pub cfg: HubConfig,
    /// What the relay counts (`/metrics`, `/status`).
    pub metrics: Arc<Metrics>,
    inner: Mutex<HubInner>,
    next_session: AtomicU32,
    /// Set by [`Hub::shutdown`]: dying links' sessions are closed, not re-queued.
    shutting_down: AtomicBool,
    /// Sessions' windows: their size, how far they grow, the relay-wide growth budget.
    windows: WindowConfig,
}

#[derive(Default)]
struct HubInner {
    backends: HashMap<String, Backend>,
    links: HashMap<String, Arc<Link>>,
    /// IDs of the sessions alive now: a new ID is never one of these.
    live: HashSet<u32>,
    per_backend: HashMap<String, usize>,
    per_client: HashMap<IpAddr, usize>,
}

/// Adds `delta` to a counter in `map`, forgetting it at zero.
fn count<K: std::hash::Hash + Eq + Clone>(map: &mut HashMap<K, usize>, key: &K, up: bool) {
    if up {
        *map.entry(key.clone()).or_insert(0) += 1;
    } else if let Some(n) = map.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(key);
        }
    }
}

#[derive(Default)]
struct Backend {
    links: Vec<Arc<Link>>,
    pending: VecDeque<Arc<RelaySession>>,
}

/// One registered agent: its two reliable frame streams and the sessions bound to it.
pub struct Link {
    pub id: String,
    pub backend: String,
    pub agent: String,
    /// Where the agent registered from, and when.
    pub addr: std::net::SocketAddr,
    pub registered: Instant,
    /// The transport the agent used last ([`Transport`] as a number; 0: none yet).
    transport: std::sync::atomic::AtomicU8,
    /// The credential the agent registered with: every later request on the link must present
    /// it too. `None` when the relay requires none of agents.
    pub credential: Option<SecretHash>,
    state: Mutex<LinkState>,
    /// Wakes whatever serves the link (a poll, or a stream's writer): frames to send, sessions
    /// pending for its backend, an ack to send, or a newer poll or stream taking over.
    notify: Notify,
    /// Wakes pushes waiting for their turn: frames from the agent were taken in.
    arrived: Notify,
}

struct LinkState {
    /// relay -> agent frames not yet acknowledged.
    send: SendBuffer,
    /// agent -> relay sequence tracking.
    recv: RecvState,
    sessions: HashMap<u32, Arc<RelaySession>>,
    dead: bool,
    last_seen: Instant,
    in_flight: usize,
    /// Bumped by every stream and by a poll that restarts the link's sending position; an older
    /// stream or poll seeing a newer number steps aside.
    generation: u64,
    /// The next frame to hand to a poll. Several polls may be in flight: each takes the range
    /// from here on, so they carry different frames. A poll of a new round (the agent lost one,
    /// or is starting long-poll) or a stream moves it back to the agent's ack.
    poll_next: u64,
    /// The agent's latest poll round (see [`Hub::poll`]).
    poll_round: u64,
    /// Polls being served now.
    polls_held: usize,
    /// Pushes holding their body until the frames before theirs have arrived.
    waiting_pushes: usize,
}

impl LinkState {
    /// Forgets the frames the agent acknowledged; fails if the link is dead or the ack is
    /// beyond what was sent.
    fn apply_ack(&mut self, link: &Link, ack: u64) -> Result<(), HubError> {
        if self.dead {
            return Err(HubError::UnknownLink(link.short_id().to_string()));
        }
        self.send.ack(ack).map_err(|e| HubError::Protocol {
            link: link.short_id().to_string(),
            what: e.to_string(),
        })
    }
}

/// Counts a request out of one of its link's counters when dropped: however its wait ends,
/// also when its connection goes away and the request with it.
struct Counted<'a>(&'a Link, fn(&mut LinkState) -> &mut usize);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        let mut st = lock(&self.0.state);
        let n = (self.1)(&mut st);
        *n = n.saturating_sub(1);
    }
}

/// What a push may do with the frames it carries.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    /// Every whole frame so far was taken in.
    Taken,
    /// The push starts past frames that have not arrived yet (another push in flight carries
    /// them): hold its body until [`Hub::wait_for_turn`] says the relay has them.
    NotYetItsTurn { first_seq: u64 },
}

/// How long a poll waits for the rest of a burst of frames (see [`Hub::poll`]).
const BURST_LINGER: Duration = Duration::from_millis(2);

/// Pushes that may wait for their turn at once on one link; later ones are answered with the
/// relay's ack at once and sent again by the agent.
pub const MAX_WAITING_PUSHES: usize = 8;

/// A frontend's session as the relay holds it.
pub struct RelaySession {
    pub id: u32,
    pub backend: String,
    pub client: IpAddr,
    /// Set by the first [`Hub::close_session`]; later calls do nothing.
    closed: AtomicBool,
    /// Whether anything but the OPEN has crossed the link for this session, either way. Until
    /// then the session can move to another agent if its link dies: nothing of the client's
    /// reached a backend, and nothing of a backend's reached the client.
    exchanged: AtomicBool,
    open: Bytes,
    handle: Arc<SessionHandle>,
    state: Mutex<SessionState>,
}

enum SessionState {
    /// Waiting for an agent; frames the client sends meanwhile wait here (bounded by the window).
    Pending(Vec<Frame>),
    Bound(Arc<Link>),
    Finished,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks is a bug; keep serving rather than cascade.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl FrameSink for RelaySession {
    fn send(&self, frame: Frame) {
        let mut st = lock(&self.state);
        match &mut *st {
            SessionState::Pending(buf) => buf.push(frame),
            SessionState::Bound(link) => {
                self.exchanged.store(true, Ordering::Release);
                link.send(frame)
            }
            SessionState::Finished => {}
        }
    }
}

impl RelaySession {
    /// Waits for the agent's word on this session: OPENED (the backend accepted) or CLOSE.
    pub fn on_accept(&self) -> tokio::sync::oneshot::Receiver<Frame> {
        self.handle.on_accept()
    }

    /// The session's pump has ended: stop routing frames to it.
    pub fn finish(&self) {
        let mut st = lock(&self.state);
        if let SessionState::Bound(link) = &*st {
            lock(&link.state).sessions.remove(&self.id);
        }
        *st = SessionState::Finished;
    }

    pub fn is_pending(&self) -> bool {
        matches!(*lock(&self.state), SessionState::Pending(_))
    }

    /// Ends a session that no agent took in time.
    pub fn expire(&self, reason: &str) -> bool {
        let mut st = lock(&self.state);
        if !matches!(*st, SessionState::Pending(_)) {
            return false;
        }
        *st = SessionState::Finished;
        self.handle.terminate(Frame::close(self.id, 1013, reason));
        true
    }

    /// Binds a pending session to `link`: its OPEN and the frames it buffered go out in order.
    /// False if the session is no longer pending or the link died meanwhile.
    fn bind(self: &Arc<Self>, link: &Arc<Link>) -> bool {
        let mut st = lock(&self.state);
        let SessionState::Pending(buffered) = &mut *st else {
            return false;
        };
        {
            let mut ls = lock(&link.state);
            if ls.dead {
                return false;
            }
            ls.send
                .push(Frame::new(Kind::Open, 0, self.id, self.open.clone()));
            if !buffered.is_empty() {
                self.exchanged.store(true, Ordering::Release);
            }
            for f in buffered.drain(..) {
                ls.send.push(f);
            }
            ls.sessions.insert(self.id, self.clone());
        }
        *st = SessionState::Bound(link.clone());
        true
    }

    /// Takes a session back from dead `link` if nothing but its OPEN went over it (see
    /// `exchanged`): it waits for another agent as if it had just been opened.
    fn unbind(&self, link: &Arc<Link>) -> bool {
        let mut st = lock(&self.state);
        match &*st {
            SessionState::Bound(l) if Arc::ptr_eq(l, link) => {}
            _ => return false,
        }
        if self.exchanged.load(Ordering::Acquire) {
            return false;
        }
        *st = SessionState::Pending(Vec::new());
        true
    }
}

impl Link {
    /// The transport the agent used last, if it has used one.
    pub fn transport(&self) -> Option<Transport> {
        Transport::from_u8(self.transport.load(Ordering::Relaxed))
    }

    /// The link ID shortened for logs: enough to tell links apart, too little to use one (a link
    /// ID is half of what a request on the link needs; the other half is the credential).
    pub fn short_id(&self) -> &str {
        self.id.get(..8).unwrap_or(&self.id)
    }

    /// Queues a frame for the agent and wakes its poll.
    pub fn send(&self, frame: Frame) {
        {
            let mut st = lock(&self.state);
            if st.dead {
                return;
            }
            st.send.push(frame);
        }
        self.wake();
    }

    /// Wakes the poll or stream writer serving this link. Every waiter registers before it looks
    /// at the state, so waking all current waiters loses no wake-up.
    pub fn wake(&self) {
        self.notify.notify_waiters();
    }

    /// A future that completes at the next [`Link::wake`]; create it before checking the state.
    pub fn woken(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }

    /// Notes that the agent was heard from, with `delta` more (or fewer) requests in flight.
    pub(crate) fn touch(&self, delta: isize) {
        let mut st = lock(&self.state);
        st.last_seen = Instant::now();
        st.in_flight = st.in_flight.saturating_add_signed(delta);
    }
}

/// One backend as the status page shows it.
#[derive(Debug, Clone)]
pub struct BackendStatus {
    pub id: String,
    pub links: Vec<LinkStatus>,
    /// Sessions held (bound or waiting).
    pub sessions: usize,
    /// Of those, waiting for an agent.
    pub pending: usize,
}

/// One agent link as the status page shows it.
#[derive(Debug, Clone)]
pub struct LinkStatus {
    pub id: String,
    pub agent: String,
    pub addr: std::net::SocketAddr,
    pub transport: Option<Transport>,
    pub connected_for: Duration,
    pub last_seen: Duration,
    pub sessions: usize,
}

/// A session just opened: the relay's side, the pump's peer, and (when the client offered
/// subprotocols) where the agent's OPENED or CLOSE arrives.
pub type Opened = (
    Arc<RelaySession>,
    SessionPeer,
    Option<tokio::sync::oneshot::Receiver<Frame>>,
);

/// Keeps a link marked busy while an agent request is being served.
pub struct InFlight(Arc<Link>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch(-1);
    }
}

impl Hub {
    pub fn new(cfg: HubConfig) -> Self {
        let windows = WindowConfig {
            initial: cfg.window,
            max: cfg.max_window.max(cfg.window),
            budget: Budget::new(cfg.window_budget),
        };
        Self {
            cfg,
            metrics: Arc::new(Metrics::new()),
            inner: Mutex::new(HubInner::default()),
            next_session: AtomicU32::new(1),
            shutting_down: AtomicBool::new(false),
            windows,
        }
    }

    pub fn link_info(&self, link: &str) -> LinkInfo {
        LinkInfo {
            link: link.to_string(),
            poll_hold_ms: self.cfg.poll_hold.as_millis() as u64,
            window: self.cfg.window,
            max_window: self.windows.max,
            max_batch_bytes: self.cfg.max_batch_bytes as u32,
            agent_timeout_ms: self.cfg.agent_timeout.as_millis() as u64,
            exposed: None,
        }
    }

    /// Registers a new agent link for `backend`, bound to `credential`.
    pub fn register(
        &self,
        backend: &str,
        agent: &str,
        addr: std::net::SocketAddr,
        credential: Option<SecretHash>,
    ) -> Arc<Link> {
        let link = Arc::new(Link {
            id: uuid::Uuid::new_v4().to_string(),
            backend: backend.to_string(),
            agent: agent.to_string(),
            addr,
            registered: Instant::now(),
            transport: std::sync::atomic::AtomicU8::new(0),
            credential,
            state: Mutex::new(LinkState {
                send: SendBuffer::new(),
                recv: RecvState::new(),
                sessions: HashMap::new(),
                dead: false,
                last_seen: Instant::now(),
                in_flight: 0,
                generation: 0,
                poll_next: 0,
                poll_round: 0,
                polls_held: 0,
                waiting_pushes: 0,
            }),
            notify: Notify::new(),
            arrived: Notify::new(),
        });
        let mut inner = lock(&self.inner);
        inner.links.insert(link.id.clone(), link.clone());
        let b = inner.backends.entry(backend.to_string()).or_default();
        b.links.push(link.clone());
        let credential = credential.map_or_else(|| "none".to_string(), |c| c.fingerprint());
        info!(link.id = link.short_id(), backend.id = backend, agent = agent, agent.addr = %addr, credential, agents = b.links.len(), "agent registered");
        drop(inner);
        self.metrics
            .registrations
            .get_or_create(&self.metrics.backend(backend))
            .inc();
        link
    }

    /// Looks up a live link and marks a request in flight on it. The request must present the
    /// credential the link was registered with (`presented`: its bearer token); otherwise the
    /// link is as good as unknown to it.
    pub fn enter(
        &self,
        link_id: &str,
        presented: Option<&str>,
    ) -> Result<(Arc<Link>, InFlight), HubError> {
        let unknown = || HubError::UnknownLink(link_id.get(..8).unwrap_or(link_id).to_string());
        let link = lock(&self.inner)
            .links
            .get(link_id)
            .cloned()
            .ok_or_else(unknown)?;
        if let Some(want) = &link.credential {
            let got = presented.map(|p| SecretHash::of(p.as_bytes()));
            if !got.is_some_and(|g| want.matches(&g)) {
                return Err(HubError::WrongCredential(link.short_id().to_string()));
            }
        }
        link.touch(1);
        let guard = InFlight(link.clone());
        Ok((link, guard))
    }

    /// Opens a session (see [`Hub::try_open_session`]) and counts it, or its refusal.
    pub fn open_session(
        &self,
        backend: &str,
        open: &OpenRequest,
        client: IpAddr,
        backend_cap: Option<usize>,
    ) -> Result<Opened, HubError> {
        let opened = self.try_open_session(backend, open, client, backend_cap);
        let m = &self.metrics;
        match &opened {
            Ok(_) => {
                m.sessions_opened.get_or_create(&m.backend(backend)).inc();
            }
            Err(e) => {
                let why = match e {
                    HubError::NoAgent(_) => Refused::NoAgent,
                    HubError::PendingFull(..) => Refused::PendingFull,
                    _ => Refused::SessionLimit,
                };
                m.refused(why, || {
                    format!("a session to backend '{backend}' from {client}: {e}")
                });
            }
        }
        opened
    }

    /// Opens a session for a frontend. Fails at once when no agent serves the backend.
    ///
    /// When the client offered subprotocols, the third value receives the agent's OPENED (with
    /// the backend's choice) or CLOSE, so the upgrade can be answered with the real choice.
    fn try_open_session(
        &self,
        backend: &str,
        open: &OpenRequest,
        client: IpAddr,
        backend_cap: Option<usize>,
    ) -> Result<Opened, HubError> {
        let payload = Bytes::from(serde_json::to_vec(open).unwrap_or_default());
        let mut guard = lock(&self.inner);
        let inner = &mut *guard;
        if inner.live.len() >= self.cfg.max_sessions {
            return Err(HubError::TooManySessions(self.cfg.max_sessions));
        }
        let cap = backend_cap.unwrap_or(self.cfg.max_sessions_per_backend);
        if inner.per_backend.get(backend).copied().unwrap_or(0) >= cap {
            return Err(HubError::BackendFull(backend.to_string(), cap));
        }
        if inner.per_client.get(&client).copied().unwrap_or(0) >= self.cfg.max_sessions_per_client {
            return Err(HubError::ClientFull(self.cfg.max_sessions_per_client));
        }
        let b = match inner.backends.get_mut(backend) {
            Some(b) if !b.links.is_empty() => b,
            _ => return Err(HubError::NoAgent(backend.to_string())),
        };
        b.pending.retain(|s| s.is_pending());
        if b.pending.len() >= self.cfg.max_pending_per_backend {
            return Err(HubError::PendingFull(backend.to_string(), b.pending.len()));
        }
        // The counter wraps after 2^32 sessions: skip 0 and every ID still alive, so a new
        // session never takes over a live one's frames. (At most max_sessions are alive.)
        let id = loop {
            let id = self.next_session.fetch_add(1, Ordering::Relaxed);
            if id != 0 && !inner.live.contains(&id) {
                break id;
            }
        };
        let (handle, peer) = new_session(id, &self.windows);
        let session = Arc::new(RelaySession {
            id,
            backend: backend.to_string(),
            client,
            closed: AtomicBool::new(false),
            exchanged: AtomicBool::new(false),
            open: payload,
            handle: Arc::new(handle),
            state: Mutex::new(SessionState::Pending(Vec::new())),
        });
        // Registered before any agent can see the session, so its answer cannot be missed.
        let accepted = (!open.protocols.is_empty()).then(|| session.on_accept());
        b.pending.push_back(session.clone());
        for link in &b.links {
            link.wake();
        }
        inner.live.insert(id);
        count(&mut inner.per_backend, &backend.to_string(), true);
        count(&mut inner.per_client, &client, true);
        Ok((session, peer, accepted))
    }

    /// Call when a session's pump has ended (more calls do nothing).
    pub fn close_session(&self, session: &RelaySession) {
        if session.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        session.finish();
        let mut inner = lock(&self.inner);
        inner.live.remove(&session.id);
        count(&mut inner.per_backend, &session.backend, false);
        count(&mut inner.per_client, &session.client, false);
    }

    /// Whether any agent serves `backend` now.
    pub fn has_agent(&self, backend: &str) -> bool {
        lock(&self.inner)
            .backends
            .get(backend)
            .is_some_and(|b| !b.links.is_empty())
    }

    /// Sessions open now: in all, to `backend`, and from `client`.
    pub fn session_counts(&self, backend: &str, client: IpAddr) -> (usize, usize, usize) {
        let inner = lock(&self.inner);
        (
            inner.live.len(),
            inner.per_backend.get(backend).copied().unwrap_or(0),
            inner.per_client.get(&client).copied().unwrap_or(0),
        )
    }

    /// Closes the links whose credential `allowed` no longer accepts (after a credentials
    /// reload); the others and their sessions go on untouched. Returns how many were closed.
    pub fn revoke(&self, allowed: impl Fn(&str, Option<SecretHash>) -> bool) -> usize {
        let links: Vec<Arc<Link>> = lock(&self.inner).links.values().cloned().collect();
        let mut closed = 0;
        for link in links {
            if !allowed(&link.backend, link.credential) {
                warn!(link.id = link.short_id(), backend.id = %link.backend, "closing agent link: its credential was removed from the credentials file");
                self.kill_link(&link, 1008, "the agent's credential was revoked");
                closed += 1;
            }
        }
        closed
    }

    /// Moves sessions waiting for this link's backend onto the link.
    pub fn claim_pending(&self, link: &Arc<Link>) {
        let claimed: Vec<Arc<RelaySession>> = {
            let mut inner = lock(&self.inner);
            let Some(b) = inner.backends.get_mut(&link.backend) else {
                return;
            };
            let n = b.pending.len().min(MAX_CLAIM_PER_POLL);
            b.pending.drain(..n).collect()
        };
        let mut unbound = Vec::new();
        for s in claimed {
            if s.bind(link) {
                debug!(
                    session.id = s.id,
                    link.id = link.short_id(),
                    "session handed to agent"
                );
            } else if s.is_pending() {
                unbound.push(s);
            }
        }
        if !unbound.is_empty() {
            let mut inner = lock(&self.inner);
            if let Some(b) = inner.backends.get_mut(&link.backend) {
                for s in unbound.into_iter().rev() {
                    b.pending.push_front(s);
                }
            }
        }
    }

    /// Serves one long-poll: applies the agent's ack, then answers as soon as there are frames
    /// no other poll has taken, or with an empty batch when the hold time runs out.
    ///
    /// The agent numbers its polls in rounds and starts a new round when it starts long-poll or
    /// loses a poll. The first poll of a new round sends again everything from the agent's ack
    /// and makes the polls held until then answer at once, empty; a poll of an older round
    /// (overtaken on the way) answers empty at once. So a range given to a poll that the agent
    /// loses is always given again.
    pub async fn poll(&self, link: &Arc<Link>, ack: u64, round: u64) -> Result<Batch, HubError> {
        let generation = {
            let mut st = lock(&link.state);
            st.apply_ack(link, ack)?;
            if round < st.poll_round {
                return Ok(self.empty_batch(&st));
            }
            if round > st.poll_round {
                st.poll_round = round;
                st.generation += 1;
                st.poll_next = st.send.base();
                link.wake();
            }
            st.generation
        };
        let deadline = tokio::time::Instant::now() + self.cfg.poll_hold;
        let mut lingered = false;
        lock(&link.state).polls_held += 1;
        let _held = Counted(link, |st| &mut st.polls_held);
        loop {
            let notified = link.woken();
            self.claim_pending(link);
            let linger = {
                let mut st = lock(&link.state);
                if st.dead {
                    return Err(HubError::UnknownLink(link.short_id().to_string()));
                }
                // A newer stream, or a poll of a newer round, has taken over: what this poll
                // would carry may already be on its way again.
                if st.generation != generation {
                    return Ok(self.empty_batch(&st));
                }
                let from = st.poll_next.max(st.send.base());
                // Frames come in bursts (a new session's OPEN and its client's first bytes, a
                // close and the next open). When this is the only poll held, whatever comes
                // after it waits a round trip for the agent's next poll: so it waits briefly
                // (once) for the rest of the burst to ride along.
                let last_held = st.polls_held <= 1;
                if st.send.has_from(from) && (lingered || !last_held) {
                    let ack = st.recv.ack();
                    let (batch, n) = st.send.encode_batch(from, ack, self.cfg.max_batch_bytes);
                    self.metrics.frames_resent.inc_by(st.send.take_resent());
                    st.poll_next = from + n as u64;
                    return Ok(batch);
                }
                st.send.has_from(from)
            };
            if linger {
                lingered = true;
                tokio::time::sleep(BURST_LINGER).await;
                continue;
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => {
                    return Ok(self.empty_batch(&lock(&link.state)));
                }
            }
        }
    }

    /// A batch without frames: the relay's ack, and where its next frames start.
    fn empty_batch(&self, st: &LinkState) -> Batch {
        BatchEncoder::new(BatchHeader {
            ack: st.recv.ack(),
            first_seq: st.poll_next.max(st.send.base()),
        })
        .finish()
    }

    /// Starts a poll or a stream on `link`: applies the agent's ack and makes any older poll or
    /// stream of the link step aside. Returns the new one's generation (see
    /// [`Hub::stream_next`]).
    pub fn take_over(&self, link: &Arc<Link>, ack: u64) -> Result<u64, HubError> {
        let generation = {
            let mut st = lock(&link.state);
            st.apply_ack(link, ack)?;
            st.generation += 1;
            st.generation
        };
        link.wake();
        Ok(generation)
    }

    /// What a stream writer of `generation` should send next. `force` sends a batch even when
    /// it carries nothing new. `Ok(None)` when a newer poll or stream has taken over.
    pub fn stream_next(
        &self,
        link: &Arc<Link>,
        generation: u64,
        cursor: &mut StreamCursor,
        force: bool,
    ) -> Result<Option<StreamNext>, HubError> {
        let mut st = lock(&link.state);
        if st.dead {
            return Err(HubError::UnknownLink(link.short_id().to_string()));
        }
        if st.generation != generation {
            return Ok(None);
        }
        let ack = st.recv.ack();
        let next = cursor.next_batch(&mut st.send, ack, force);
        self.metrics.frames_resent.inc_by(st.send.take_resent());
        Ok(Some(next))
    }

    /// Delivers the whole frames that have arrived so far in a push body. Called as body chunks
    /// come in, so a push cut half-way still delivers what it carried. With `may_wait` (a
    /// long-poll push, one of several in flight), a batch that starts past the frames taken in
    /// so far is left unread for its turn; otherwise (a stream) that is a protocol error.
    pub fn push_frames(
        &self,
        link: &Arc<Link>,
        reader: &mut BatchReader,
        may_wait: bool,
    ) -> Result<Pushed, HubError> {
        let protocol = |what: String| HubError::Protocol {
            link: link.short_id().to_string(),
            what,
        };
        let mut st = lock(&link.state);
        if st.dead {
            return Err(HubError::UnknownLink(link.short_id().to_string()));
        }
        let first = !reader.has_header();
        if let Some(header) = reader.header().map_err(|e| protocol(e.to_string()))? {
            if first {
                st.send
                    .ack(header.ack)
                    .map_err(|e| protocol(e.to_string()))?;
            }
            // Frames are taken in only in order: a batch that starts past the ones taken in
            // so far waits until another push has brought those.
            if may_wait && header.first_seq > st.recv.ack() {
                return Ok(Pushed::NotYetItsTurn {
                    first_seq: header.first_seq,
                });
            }
        }
        let before = st.recv.ack();
        let mut woke = false;
        while let Some((seq, frame)) = reader.next_frame().map_err(|e| protocol(e.to_string()))? {
            match st.recv.arrive(seq).map_err(|e| protocol(e.to_string()))? {
                Arrival::Duplicate => continue,
                Arrival::Deliver => {}
            }
            let id = frame.session;
            if frame.is_blocked() {
                self.metrics.window_stalls.inc();
            }
            match frame.kind {
                Kind::Open => {
                    return Err(protocol("agent sent an OPEN frame".into()));
                }
                Kind::Opened => {
                    debug!(
                        session.id = id,
                        link.id = link.short_id(),
                        "backend accepted the session"
                    );
                }
                _ => {}
            }
            let Some(session) = st.sessions.get(&id).cloned() else {
                continue; // the session ended here first; late frames are dropped
            };
            session.exchanged.store(true, Ordering::Release);
            let handle = &session.handle;
            // A CLOSE leaves the handle in place: the session lives on until its pump has
            // finished the close handshake (and takes window credit meanwhile).
            if let Err(v) = handle.deliver(frame) {
                warn!(
                    session.id = id,
                    link.id = link.short_id(),
                    "dropping session: {v}"
                );
                handle.terminate(Frame::close(id, 1011, "agent broke flow control"));
                st.send.push(Frame::abort(id, "flow control violated"));
                st.sessions.remove(&id);
                woke = true;
            }
        }
        let advanced = st.recv.ack() != before;
        drop(st);
        if woke {
            link.wake();
        }
        if advanced {
            link.arrived.notify_waiters();
        }
        Ok(Pushed::Taken)
    }

    /// Holds a push that is [`Pushed::NotYetItsTurn`] until the frames before `first_seq` have
    /// arrived (true), or until the hold time runs out or too many pushes wait (false: answer
    /// with the ack, and the agent sends again what it has to).
    pub async fn wait_for_turn(&self, link: &Arc<Link>, first_seq: u64) -> bool {
        {
            let mut st = lock(&link.state);
            if st.waiting_pushes >= MAX_WAITING_PUSHES {
                return false;
            }
            st.waiting_pushes += 1;
        }
        let _waiting = Counted(link, |st| &mut st.waiting_pushes);
        let deadline = tokio::time::Instant::now() + self.cfg.poll_hold;
        loop {
            let arrived = link.arrived.notified();
            {
                let st = lock(&link.state);
                if st.dead {
                    break false;
                }
                if st.recv.ack() >= first_seq {
                    break true;
                }
            }
            tokio::select! {
                _ = arrived => {}
                _ = tokio::time::sleep_until(deadline) => break false,
            }
        }
    }

    /// The answer to a push: a batch header carrying the relay's ack for the agent's frames.
    pub fn push_ack(&self, link: &Arc<Link>) -> Batch {
        let st = lock(&link.state);
        BatchEncoder::new(BatchHeader {
            ack: st.recv.ack(),
            first_seq: st.send.next_seq(),
        })
        .finish()
    }

    /// Declares a link dead and forgets it. Its sessions that exchanged nothing over it but the
    /// OPEN go back to waiting for an agent (a session handed to an agent that died at that
    /// moment is not lost); the others are closed with `reason`.
    pub fn kill_link(&self, link: &Arc<Link>, code: u16, reason: &str) {
        let sessions = {
            let mut st = lock(&link.state);
            if st.dead {
                return;
            }
            st.dead = true;
            std::mem::take(&mut st.sessions)
        };
        let shutting_down = self.shutting_down.load(Ordering::Acquire);
        let mut requeued = Vec::new();
        for (id, session) in &sessions {
            if !shutting_down && session.unbind(link) {
                requeued.push(session.clone());
            } else {
                session.handle.terminate(Frame::close(*id, code, reason));
            }
        }
        link.wake();
        link.arrived.notify_waiters();
        let mut inner = lock(&self.inner);
        inner.links.remove(&link.id);
        if let Some(b) = inner.backends.get_mut(&link.backend) {
            b.links.retain(|l| !Arc::ptr_eq(l, link));
            if !requeued.is_empty() {
                debug!(
                    link.id = link.short_id(),
                    sessions = requeued.len(),
                    "sessions the dead link had not started wait for another agent"
                );
                for s in requeued.into_iter().rev() {
                    b.pending.push_front(s);
                }
                for l in &b.links {
                    l.wake();
                }
            }
            let left = b.links.len();
            if left == 0 {
                // Nobody can take the waiting sessions any more: new agents get them if they come
                // in time, else they expire.
                if b.pending.is_empty() {
                    inner.backends.remove(&link.backend);
                }
            }
            info!(link.id = link.short_id(), backend.id = %link.backend, sessions = sessions.len(), agents_left = left, "agent link closed: {reason}");
        }
    }

    /// Closes links whose agent has gone quiet. Run periodically.
    pub fn reap(&self) {
        let links: Vec<Arc<Link>> = lock(&self.inner).links.values().cloned().collect();
        for link in links {
            let quiet = {
                let st = lock(&link.state);
                st.in_flight == 0 && st.last_seen.elapsed() > self.cfg.agent_timeout
            };
            if quiet {
                warn!(link.id = link.short_id(), backend.id = %link.backend, "agent stopped polling for {:?}; closing its link", self.cfg.agent_timeout);
                let reason = format!(
                    "the agent for backend '{}' stopped responding",
                    link.backend
                );
                self.kill_link(&link, 1011, &reason);
            }
        }
    }

    /// Closes every link and session (relay shutdown).
    pub fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
        let links: Vec<Arc<Link>> = lock(&self.inner).links.values().cloned().collect();
        for link in links {
            self.kill_link(&link, 1001, "relay is shutting down");
        }
    }

    /// Notes that `link` is being served over `transport`, counting a change of transport.
    pub fn note_transport(&self, link: &Link, transport: Transport) {
        let before = link.transport.swap(transport as u8, Ordering::Relaxed);
        if let Some(from) = Transport::from_u8(before).filter(|t| *t != transport) {
            self.metrics
                .transport_changes
                .get_or_create(&crate::metrics::ChangeLabels {
                    from: from.label(),
                    to: transport.label(),
                })
                .inc();
        }
    }

    /// What the status page and the gauges show: every backend with an agent or a session, its
    /// links and session counts, sorted by backend ID.
    pub fn snapshot(&self) -> Vec<BackendStatus> {
        // Copied out under the hub's lock, then each link's state read on its own: never
        // both locks at once.
        let backends: Vec<(String, Vec<Arc<Link>>, usize, usize)> = {
            let inner = lock(&self.inner);
            let mut ids: Vec<&String> = inner.backends.keys().collect();
            ids.extend(inner.per_backend.keys());
            ids.sort();
            ids.dedup();
            ids.into_iter()
                .map(|id| {
                    let b = inner.backends.get(id);
                    (
                        id.clone(),
                        b.map(|b| b.links.clone()).unwrap_or_default(),
                        inner.per_backend.get(id).copied().unwrap_or(0),
                        b.map_or(0, |b| b.pending.len()),
                    )
                })
                .collect()
        };
        backends
            .into_iter()
            .map(|(id, links, sessions, pending)| BackendStatus {
                id,
                links: links
                    .iter()
                    .map(|l| {
                        let st = lock(&l.state);
                        LinkStatus {
                            id: l.short_id().to_string(),
                            agent: l.agent.clone(),
                            addr: l.addr,
                            transport: l.transport(),
                            connected_for: l.registered.elapsed(),
                            last_seen: st.last_seen.elapsed(),
                            sessions: st.sessions.len(),
                        }
                    })
                    .collect(),
                sessions,
                pending,
            })
            .collect()
    }

    /// The metrics in the text format, gauges read from the hub now. Scrapes take turns: the
    /// gauges are cleared and refilled for each.
    pub fn scrape(&self) -> String {
        let _turn = self
            .metrics
            .scrape
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.update_gauges();
        self.metrics.encode()
    }

    /// Sets the gauges from the hub's state (under [`Metrics::scrape`]).
    fn update_gauges(&self) {
        let m = &self.metrics;
        m.links.clear();
        m.sessions_open.clear();
        m.sessions_pending.clear();
        for b in self.snapshot() {
            let label = m.backend(&b.id);
            for l in &b.links {
                let transport = l.transport.map_or("none", Transport::label).to_string();
                m.links
                    .get_or_create(&crate::metrics::LinkLabels {
                        backend: label.backend.clone(),
                        transport,
                    })
                    .inc();
            }
            m.sessions_open
                .get_or_create(&label)
                .inc_by(b.sessions as i64);
            m.sessions_pending
                .get_or_create(&label)
                .inc_by(b.pending as i64);
        }
    }

    /// Number of live agent links (for health output).
    pub fn link_count(&self) -> usize {
        lock(&self.inner).links.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> Hub {
        Hub::new(HubConfig {
            poll_hold: Duration::from_secs(1),
            agent_timeout: Duration::from_secs(1),
            open_timeout: Duration::from_secs(1),
            window: 64 * 1024,
            max_window: 64 * 1024,
            window_budget: 0,
            max_batch_bytes: 64 * 1024,
            max_sessions: 4,
            max_sessions_per_backend: 3,
            max_sessions_per_client: 2,
            max_pending_per_backend: 16,
            max_message: 1 << 20,
        })
    }

    fn open() -> OpenRequest {
        OpenRequest {
            path: "/".into(),
            headers: vec![],
            protocols: vec![],
            client_addr: None,
        }
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    const AGENT: &str = "127.0.0.1:1";

    #[test]
    fn a_session_handed_to_an_agent_that_died_moves_to_the_next() {
        let hub = hub();
        let dead = hub.register("b", "dead", AGENT.parse().unwrap(), None);
        let (s, _peer, _) = hub.open_session("b", &open(), ip(1), None).unwrap();
        hub.claim_pending(&dead);
        assert!(!s.is_pending(), "the first agent took it");
        let alive = hub.register("b", "alive", AGENT.parse().unwrap(), None);
        hub.kill_link(&dead, 1011, "agent stopped responding");
        assert!(
            s.is_pending(),
            "only the OPEN went to the dead agent: it waits again"
        );
        hub.claim_pending(&alive);
        assert!(lock(&alive.state).sessions.contains_key(&s.id));
        assert!(
            lock(&alive.state).send.has_from(0),
            "its OPEN went out again"
        );

        // Once client data has gone over a link, its death ends the session instead.
        FrameSink::send(
            &*s,
            Frame::data(s.id, false, true, Bytes::from_static(b"x")),
        );
        hub.kill_link(&alive, 1011, "agent stopped responding");
        assert!(!s.is_pending());
        assert!(matches!(*lock(&s.state), SessionState::Bound(_)));
    }

    #[test]
    fn session_caps_per_client_per_backend_and_in_all() {
        let hub = hub();
        let _a = hub.register("a", "x", AGENT.parse().unwrap(), None);
        let _b = hub.register("b", "x", AGENT.parse().unwrap(), None);
        let s1 = hub.open_session("a", &open(), ip(1), None).unwrap().0;
        let _s2 = hub.open_session("a", &open(), ip(1), None).unwrap();
        assert!(matches!(
            hub.open_session("a", &open(), ip(1), None),
            Err(HubError::ClientFull(2))
        ));
        let _s3 = hub.open_session("a", &open(), ip(2), None).unwrap();
        assert!(matches!(
            hub.open_session("a", &open(), ip(3), None),
            Err(HubError::BackendFull(_, 3))
        ));
        // A credentials file's own cap for the backend wins over the flag.
        assert!(hub.open_session("a", &open(), ip(3), Some(4)).is_ok());
        assert!(matches!(
            hub.open_session("b", &open(), ip(4), None),
            Err(HubError::TooManySessions(4))
        ));
        hub.close_session(&s1);
        hub.close_session(&s1); // a second close changes nothing
        assert_eq!(hub.session_counts("a", ip(1)), (3, 3, 1));
        assert!(hub.open_session("b", &open(), ip(4), None).is_ok());
    }

    #[test]
    fn session_ids_skip_live_ones_when_the_counter_wraps() {
        let hub = hub();
        let _l = hub.register("a", "x", AGENT.parse().unwrap(), None);
        hub.next_session.store(u32::MAX, Ordering::Relaxed);
        let s1 = hub.open_session("a", &open(), ip(1), None).unwrap().0;
        assert_eq!(s1.id, u32::MAX);
        // Wrapped: 0 is never used, and 1 is still alive.
        let s2 = hub.open_session("a", &open(), ip(2), None).unwrap().0;
        assert_eq!(s2.id, 1);
        hub.next_session.store(u32::MAX, Ordering::Relaxed);
        let s3 = hub.open_session("a", &open(), ip(3), None).unwrap().0;
        assert_eq!(s3.id, 2, "skips MAX, 0 and 1, all alive or reserved");
    }

    #[test]
    fn a_link_answers_only_to_its_credential() {
        let hub = hub();
        let cred = SecretHash::of(b"alpha");
        let link = hub.register("a", "x", AGENT.parse().unwrap(), Some(cred));
        assert!(hub.enter(&link.id, Some("alpha")).is_ok());
        assert!(matches!(
            hub.enter(&link.id, Some("beta")),
            Err(HubError::WrongCredential(_))
        ));
        assert!(matches!(
            hub.enter(&link.id, None),
            Err(HubError::WrongCredential(_))
        ));
        assert!(matches!(
            hub.enter("nope", Some("alpha")),
            Err(HubError::UnknownLink(_))
        ));
        let closed = hub.revoke(|_, c| c != Some(cred));
        assert_eq!(closed, 1);
        assert!(matches!(
            hub.enter(&link.id, Some("alpha")),
            Err(HubError::UnknownLink(_))
        ));
    }

    fn frames_of(batch: &Batch) -> (BatchHeader, Vec<u64>) {
        let (h, frames) = backhaul_common::wire::decode_batch(&batch.clone().into_bytes()).unwrap();
        (h, frames.into_iter().map(|(seq, _)| seq).collect())
    }

    fn push_batch(first_seq: u64, session: u32, count: u64) -> BatchReader {
        let mut out = bytes::BytesMut::new();
        BatchHeader { ack: 0, first_seq }.encode(&mut out);
        for _ in 0..count {
            Frame::data(session, false, true, Bytes::from_static(b"x")).encode(&mut out);
        }
        BatchReader::from_message(out.freeze())
    }

    /// Polls in flight at once carry different frames; a poll of a new round sends again from
    /// the agent's ack, and polls of older rounds answer empty.
    #[tokio::test]
    async fn concurrent_polls_carry_different_frames_and_a_restart_resends() {
        let mut hub = hub();
        hub.cfg.max_batch_bytes = 25; // two 11-byte frames (10 + 1) per batch
        let hub = Arc::new(hub);
        let link = hub.register("b", "x", AGENT.parse().unwrap(), None);
        for _ in 0..5 {
            link.send(Frame::data(9, false, true, Bytes::from_static(b"x")));
        }
        let first = hub.poll(&link, 0, 1).await.unwrap();
        let second = hub.poll(&link, 0, 1).await.unwrap();
        let third = hub.poll(&link, 0, 1).await.unwrap();
        assert_eq!(frames_of(&first).1, vec![0, 1]);
        assert_eq!(frames_of(&second).1, vec![2, 3]);
        assert_eq!(frames_of(&third).1, vec![4]);
        // The agent got 0..2 and lost the rest: a held poll steps aside for round 2.
        let held = tokio::spawn({
            let (hub, link) = (hub.clone(), link.clone());
            async move { hub.poll(&link, 2, 1).await.unwrap() }
        });
        tokio::task::yield_now().await;
        let again = hub.poll(&link, 2, 2).await.unwrap();
        assert_eq!(frames_of(&again).1, vec![2, 3]);
        let (h, seqs) = frames_of(&held.await.unwrap());
        assert!(seqs.is_empty(), "the older poll answers empty: {seqs:?}");
        assert_eq!(h.ack, 0);
        // A poll of round 1 that arrives late takes nothing either.
        let (_, seqs) = frames_of(&hub.poll(&link, 2, 1).await.unwrap());
        assert!(
            seqs.is_empty(),
            "a late poll of an old round answers empty: {seqs:?}"
        );
        assert_eq!(frames_of(&hub.poll(&link, 2, 2).await.unwrap()).1, vec![4]);
    }

    /// A push that overtakes an earlier one waits for it, and the frames reach the session in
    /// order; one whose turn never comes is answered with the ack, having taken nothing in.
    #[tokio::test(start_paused = true)]
    async fn a_push_that_overtakes_an_earlier_one_waits_for_its_turn() {
        let hub = Arc::new(hub());
        let link = hub.register("b", "x", AGENT.parse().unwrap(), None);
        let (session, _peer, _) = hub.open_session("b", &open(), ip(1), None).unwrap();
        hub.claim_pending(&link);
        let id = session.id;

        let mut later = push_batch(2, id, 2);
        assert_eq!(
            hub.push_frames(&link, &mut later, true).unwrap(),
            Pushed::NotYetItsTurn { first_seq: 2 }
        );
        assert!(
            hub.push_frames(&link, &mut push_batch(2, id, 2), false)
                .is_err(),
            "on a stream, a gap is a protocol error"
        );
        let waiter = tokio::spawn({
            let (hub, link) = (hub.clone(), link.clone());
            async move { hub.wait_for_turn(&link, 2).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        let mut earlier = push_batch(0, id, 2);
        assert_eq!(
            hub.push_frames(&link, &mut earlier, true).unwrap(),
            Pushed::Taken
        );
        assert!(waiter.await.unwrap(), "its turn came");
        assert_eq!(
            hub.push_frames(&link, &mut later, true).unwrap(),
            Pushed::Taken
        );
        assert_eq!(frames_of(&hub.push_ack(&link)).0.ack, 4);

        // Frames 4 and 5 never come: the push of 6.. gives up after the hold time.
        let mut lost = push_batch(6, id, 1);
        assert!(matches!(
            hub.push_frames(&link, &mut lost, true).unwrap(),
            Pushed::NotYetItsTurn { first_seq: 6 }
        ));
        assert!(!hub.wait_for_turn(&link, 6).await);
        assert_eq!(frames_of(&hub.push_ack(&link)).0.ack, 4);
        assert_eq!(lock(&link.state).waiting_pushes, 0);
    }
}
