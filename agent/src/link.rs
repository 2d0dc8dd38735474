//! One registered link to the relay: the long-poll loop that brings frames in, the push loop that
//! sends frames out, and the sessions they serve. Both loops survive cut HTTP exchanges by
//! retrying from the last acknowledged sequence number (see `common::reliable`).

use crate::Config;
use backhaul_common::api::{LinkInfo, OpenRequest, Opened};
use backhaul_common::backoff::Backoff;
use backhaul_common::dial::{dial, DialOptions, Dialed};
use backhaul_common::reliable::{Arrival, RecvState, SendBuffer};
use backhaul_common::session::{new_session, pump, FrameSink, SessionHandle};
use backhaul_common::wire::{decode_batch, BatchReader, Frame, Kind};
use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

/// Extra time a poll may take beyond the relay's hold time before the agent gives up on it.
const POLL_GRACE: Duration = Duration::from_secs(10);
/// Longest a push may take.
const PUSH_TIMEOUT: Duration = Duration::from_secs(30);
/// Retry delays for a poll or push that failed twice in a row (the first retry is immediate).
const RETRY_INITIAL: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// Smallest push batch the agent shrinks to after failed pushes.
const MIN_PUSH_BATCH: usize = 16 * 1024;
/// Largest poll response body accepted, as a multiple of the relay's batch size.
const MAX_POLL_BODY_FACTOR: usize = 2;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// State shared by the poll loop, the push loop and the sessions of one link.
pub struct Link {
    cfg: Arc<Config>,
    client: reqwest::Client,
    info: LinkInfo,
    url: String,
    out: Mutex<SendBuffer>,
    out_notify: Notify,
    /// The poll loop's receive position, sent as the ack in pushes too.
    down_ack: AtomicU64,
    sessions: Mutex<HashMap<u32, Arc<SessionHandle>>>,
    /// Cancelled when the link is over (relay forgot it, or shutdown).
    done: CancellationToken,
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
        client: reqwest::Client,
        info: LinkInfo,
        shutdown: &CancellationToken,
    ) -> Arc<Self> {
        let url = format!(
            "{}{}/{}",
            cfg.relay_base(),
            backhaul_common::api::LINKS_PATH,
            info.link
        );
        Arc::new(Self {
            cfg,
            client,
            info,
            url,
            out: Mutex::new(SendBuffer::new()),
            out_notify: Notify::new(),
            down_ack: AtomicU64::new(0),
            sessions: Mutex::new(HashMap::new()),
            done: shutdown.child_token(),
        })
    }

    fn send(&self, frame: Frame) {
        lock(&self.out).push(frame);
        self.out_notify.notify_one();
    }

    fn request(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.cfg.agent_token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// Runs the link until the relay forgets it or shutdown; returns why it ended.
    pub async fn run(self: Arc<Self>) -> String {
        let tracker = TaskTracker::new();
        let poll = tokio::spawn(self.clone().poll_loop(tracker.clone()));
        let push = tokio::spawn(self.clone().push_loop());
        let why = tokio::select! {
            r = poll => r.unwrap_or_else(|e| format!("poll loop failed: {e}")),
            r = push => r.unwrap_or_else(|e| format!("push loop failed: {e}")),
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

    async fn poll_loop(self: Arc<Self>, tracker: TaskTracker) -> String {
        let mut recv = RecvState::new();
        let mut backoff = Backoff::new(RETRY_INITIAL, RETRY_MAX);
        let hold = Duration::from_millis(self.info.poll_hold_ms);
        let limit = self.info.max_batch_bytes as usize * MAX_POLL_BODY_FACTOR + 64 * 1024;
        loop {
            let url = format!("{}/poll?ack={}", self.url, recv.ack());
            let req = self.request(self.client.get(url).timeout(hold + POLL_GRACE));
            let outcome = tokio::select! {
                r = self.poll_once(req, &mut recv, limit, &tracker) => r,
                _ = self.done.cancelled() => return "shutting down".into(),
            };
            self.down_ack.store(recv.ack(), Ordering::Release);
            match outcome {
                PollOutcome::Progress => backoff.reset(),
                PollOutcome::LinkGone(why) => return why,
                PollOutcome::Failed(why) => {
                    if !self.pause_after_failure(&mut backoff, "poll", &why).await {
                        return "shutting down".into();
                    }
                }
            }
        }
    }

    async fn poll_once(
        self: &Arc<Self>,
        req: reqwest::RequestBuilder,
        recv: &mut RecvState,
        limit: usize,
        tracker: &TaskTracker,
    ) -> PollOutcome {
        let mut resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return PollOutcome::Failed(describe(&e)),
        };
        if let Some(gone) = link_gone(&resp) {
            return gone;
        }
        if !resp.status().is_success() {
            let status = resp.status();
            let body = resp.text().await.unwrap_or_default();
            return PollOutcome::Failed(format!("relay answered {status}: {}", body.trim()));
        }
        let mut reader = BatchReader::new();
        let mut received = 0usize;
        let mut got_any = false;
        loop {
            let chunk = match resp.chunk().await {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    let why = format!("poll response cut: {}", describe(&e));
                    return if got_any {
                        PollOutcome::Progress
                    } else {
                        PollOutcome::Failed(why)
                    };
                }
            };
            received += chunk.len();
            if received > limit {
                return PollOutcome::Failed(format!(
                    "poll response over {limit} bytes; is something between agent and relay rewriting traffic?"
                ));
            }
            reader.push(&chunk);
            match reader.header() {
                Ok(Some(h)) if !got_any => {
                    if let Err(e) = lock(&self.out).ack(h.ack) {
                        return PollOutcome::LinkGone(format!("relay sent a bad ack: {e}"));
                    }
                    got_any = true;
                }
                Ok(_) => {}
                Err(e) => return PollOutcome::LinkGone(format!("relay sent a bad batch: {e}")),
            }
            loop {
                match reader.next_frame() {
                    Ok(Some((seq, frame))) => match recv.arrive(seq) {
                        Ok(Arrival::Deliver) => self.dispatch(frame, tracker),
                        Ok(Arrival::Duplicate) => {}
                        Err(e) => {
                            return PollOutcome::LinkGone(format!("relay broke the protocol: {e}"))
                        }
                    },
                    Ok(None) => break,
                    Err(e) => return PollOutcome::LinkGone(format!("relay sent a bad batch: {e}")),
                }
            }
        }
        match reader.finish() {
            Ok(_) => PollOutcome::Progress,
            Err(e) if got_any => {
                debug!("poll response ended early: {e}");
                PollOutcome::Progress
            }
            Err(e) => PollOutcome::Failed(format!("poll response ended early: {e}")),
        }
    }

    async fn push_loop(self: Arc<Self>) -> String {
        let mut backoff = Backoff::new(RETRY_INITIAL, RETRY_MAX);
        let max_batch = self.info.max_batch_bytes as usize;
        // Shrinks after failures so pushes get through paths that cut long requests, and grows
        // back after successes.
        let mut batch_limit = max_batch;
        loop {
            let notified = self.out_notify.notified();
            let body = {
                let out = lock(&self.out);
                if out.is_empty() {
                    None
                } else {
                    let mut buf = BytesMut::new();
                    out.encode_batch(
                        out.base(),
                        self.down_ack.load(Ordering::Acquire),
                        batch_limit,
                        &mut buf,
                    );
                    Some(buf.freeze())
                }
            };
            let Some(body) = body else {
                tokio::select! {
                    _ = notified => continue,
                    _ = self.done.cancelled() => return "shutting down".into(),
                }
            };
            let req = self.request(
                self.client
                    .post(format!("{}/push", self.url))
                    .timeout(PUSH_TIMEOUT)
                    .header(
                        reqwest::header::CONTENT_TYPE,
                        backhaul_common::api::BATCH_CONTENT_TYPE,
                    )
                    .body(body),
            );
            let outcome = tokio::select! {
                r = self.push_once(req) => r,
                _ = self.done.cancelled() => return "shutting down".into(),
            };
            match &outcome {
                PollOutcome::Progress => batch_limit = (batch_limit * 2).min(max_batch),
                _ => batch_limit = (batch_limit / 2).max(MIN_PUSH_BATCH),
            }
            match outcome {
                PollOutcome::Progress => backoff.reset(),
                PollOutcome::LinkGone(why) => return why,
                PollOutcome::Failed(why) => {
                    if !self.pause_after_failure(&mut backoff, "push", &why).await {
                        return "shutting down".into();
                    }
                }
            }
        }
    }

    /// After a failed poll or push: the first retry goes at once (a proxy cutting a connection
    /// is routine), later ones wait with jittered backoff. False if the link ended meanwhile.
    async fn pause_after_failure(&self, backoff: &mut Backoff, what: &str, why: &str) -> bool {
        if backoff.attempts() == 0 {
            debug!("{what} failed ({why}); retrying at once");
            backoff.next_delay();
            return true;
        }
        let d = backoff.next_delay();
        warn!("{what} to relay failed ({why}); retrying in {d:?}");
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = self.done.cancelled() => false,
        }
    }

    async fn push_once(&self, req: reqwest::RequestBuilder) -> PollOutcome {
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return PollOutcome::Failed(describe(&e)),
        };
        if let Some(gone) = link_gone(&resp) {
            return gone;
        }
        let status = resp.status();
        let body = match resp.bytes().await {
            Ok(b) => b,
            Err(e) => return PollOutcome::Failed(format!("push response cut: {}", describe(&e))),
        };
        if !status.is_success() {
            return PollOutcome::Failed(format!(
                "relay answered {status}: {}",
                String::from_utf8_lossy(&body).trim()
            ));
        }
        match decode_batch(&body) {
            Ok((h, _)) => match lock(&self.out).ack(h.ack) {
                Ok(()) => PollOutcome::Progress,
                Err(e) => PollOutcome::LinkGone(format!("relay sent a bad ack: {e}")),
            },
            Err(e) => PollOutcome::Failed(format!("push response unreadable: {e}")),
        }
    }

    /// Hands one in-order frame from the relay to its session, or opens a session.
    fn dispatch(self: &Arc<Self>, frame: Frame, tracker: &TaskTracker) {
        let id = frame.session;
        if frame.kind == Kind::Open {
            self.open(id, frame.payload, tracker);
            return;
        }
        let mut sessions = lock(&self.sessions);
        let Some(handle) = sessions.get(&id).cloned() else {
            return; // ended here first; late frames are dropped
        };
        let ends = frame.kind == Kind::Close;
        if let Err(v) = handle.deliver(frame) {
            warn!(session.id = id, "dropping session: relay {v}");
            handle.terminate(Frame::close(id, 1011, "relay broke flow control"));
            sessions.remove(&id);
            drop(sessions);
            self.send(Frame::abort(id, "flow control violated"));
        } else if ends {
            sessions.remove(&id);
        }
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
        let (handle, peer) = new_session(id, self.info.window);
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
                let url = link.cfg.backend_url(&open.path);
                let dial_opts = DialOptions {
                    timeout: link.cfg.connect_timeout,
                    tls: link.cfg.tls.clone(),
                    protocols: open.protocols.clone(),
                    // HTTP(S)_PROXY is for reaching the relay; the backend is local.
                    use_env_proxy: false,
                };
                let dialed = match url::Url::parse(&url) {
                    Ok(u) => dial(&u, &dial_opts).await.map_err(anyhow::Error::from),
                    Err(e) => Err(anyhow::anyhow!("bad backend URL {url}: {e}")),
                };
                match dialed {
                    Ok(Dialed { ws, protocol }) => {
                        debug!("connected to backend {url}");
                        let opened = serde_json::to_vec(&Opened { protocol }).unwrap_or_default();
                        link.send(Frame::new(Kind::Opened, 0, id, Bytes::from(opened)));
                        let summary = pump(ws, peer, Arc::new(Sink(link.clone()))).await;
                        info!(
                            bytes.to_backend = summary.received,
                            bytes.from_backend = summary.sent,
                            "session ended: {:?}",
                            summary.ending
                        );
                    }
                    Err(e) => {
                        warn!("agent could not reach backend {url}: {e:#}");
                        let reason = format!("agent could not reach backend: {e:#}");
                        link.send(Frame::close(id, 1014, &reason));
                    }
                }
                lock(&link.sessions).remove(&id);
            }
            .instrument(span),
        );
    }
}

enum PollOutcome {
    Progress,
    Failed(String),
    LinkGone(String),
}

fn link_gone(resp: &reqwest::Response) -> Option<PollOutcome> {
    (resp.status() == reqwest::StatusCode::NOT_FOUND).then(|| {
        PollOutcome::LinkGone(
            "the relay no longer knows this link (it restarted, or gave up on this agent)".into(),
        )
    })
}

/// Error text with its causes, which reqwest otherwise hides.
pub fn describe(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}
