//! The WebSocket-to-HTTP bridge (`backhaul-backend --http-bridge`), after websocket-bridge:
//! each WebSocket message of a session is POSTed to an application's HTTP(S) URL, and the
//! application sends messages back by POSTing to the session's callback URL.
//!
//! ```text
//! client -> relay -> agent -WebSocket-> backend ==POST each message==> application
//!                                        backend <==POST to callback=== application (or anyone it told)
//! ```
//!
//! A session asks for `…/connect?f=<frame URL>&d=<disconnect URL>` (`d` optional). Both URLs
//! must match one of `--allowlist` (whole-URL regular expressions; none refuses everything).
//! Every POST names the callback URL, `<base URL>/<UUID>`, in `x-ws-proxy-send`; the UUID is
//! random and the URL answers only while the session lives. docs/protocol.md ("The HTTP
//! bridge") is the reference for the headers, types, retries and close codes.

use backhaul_common::ws::{is_sendable_close_code, Event, Role, WsError, WsReader, WsWriter};
use bytes::{Bytes, BytesMut};
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use regex::Regex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::WriteHalf;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use url::Url;
use uuid::Uuid;

/// The header that gives the application the session's callback URL (websocket-bridge's name).
pub const CALLBACK_HEADER: &str = "x-ws-proxy-send";
/// The message's number within its session, from 1: a retried POST carries the same number, so
/// an application can drop a message it already took.
pub const SEQ_HEADER: &str = "x-ws-proxy-seq";
/// On the disconnect POST: the close code the session ended with (absent if there was none).
pub const CLOSE_CODE_HEADER: &str = "x-ws-proxy-close-code";
/// Content type of a text message, both ways. Any `text/*` callback is a text message.
pub const TEXT_TYPE: &str = "text/plain; charset=utf-8";
/// Content type of a binary message, both ways. Any other callback type is a binary message.
pub const BINARY_TYPE: &str = "application/octet-stream";

/// Most callback POSTs waiting to be written to one session; more get 503 with Retry-After.
pub const MAX_WAITING_CALLBACKS: usize = 16;
/// How long a callback's body may take to arrive.
const CALLBACK_BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest one frame may take to be written to a client; one that stops reading for this long
/// is dropped (its waiting callbacks get 404).
const WRITE_STALL: Duration = Duration::from_secs(30);
/// The first pause between attempts of a POST; it doubles each time.
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(200);
/// Most bytes of an application's answer read (and dropped) so its connection can be reused.
const MAX_ANSWER_READ: usize = 64 * 1024;
/// How long to wait for the client's Close after ours.
const CLOSE_WAIT: Duration = Duration::from_secs(5);
/// Close code for a session the application failed (the bridge is a gateway; RFC 6455 1014).
pub const CLOSE_APP_FAILED: u16 = 1014;
/// Close code for a session whose URLs are refused.
pub const CLOSE_REFUSED: u16 = 1008;

/// The bridge's settings, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    /// What callback URLs start with, without a trailing `/`.
    pub base_url: String,
    /// `--allowlist`, each anchored to match a whole URL.
    pub allowlist: Vec<Regex>,
    /// Largest message either way, in bytes.
    pub max_message: usize,
    /// How long one POST may take, connection included.
    pub post_timeout: Duration,
    /// Tries per POST (the first and the retries).
    pub attempts: u32,
    /// Client for the application's URLs.
    pub client: reqwest::Client,
}

/// Compiles `--allowlist` values, each anchored so that it must match the whole URL.
pub fn compile_allowlist(patterns: &[String]) -> Result<Vec<Regex>, String> {
    patterns
        .iter()
        .map(|p| {
            Regex::new(&format!("^(?:{p})$"))
                .map_err(|e| format!("--allowlist {p:?} is not a regular expression: {e}"))
        })
        .collect()
}

/// The application URLs a session asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub frame: Url,
    pub disconnect: Option<Url>,
}

/// Reads `…/connect?f=<frame URL>&d=<disconnect URL>` and checks both URLs against the
/// allowlist. The error is the reason sent to the client with [`CLOSE_REFUSED`].
pub fn parse_target(path_and_query: &str, allowlist: &[Regex]) -> Result<Target, String> {
    let (path, query) = path_and_query
        .split_once('?')
        .unwrap_or((path_and_query, ""));
    if !path.ends_with("/connect") {
        return Err("the HTTP bridge serves /connect?f=<frame URL>&d=<disconnect URL>".into());
    }
    let (mut frame, mut disconnect) = (None, None);
    for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
        let slot = match &*key {
            "f" => &mut frame,
            "d" => &mut disconnect,
            _ => continue,
        };
        if slot.is_some() {
            return Err(format!("{key}= given twice"));
        }
        *slot = Some(value.into_owned());
    }
    let check = |name: &str, raw: String| -> Result<Url, String> {
        let url = Url::parse(&raw).map_err(|e| format!("{name}= is not a URL ({e})"))?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(format!("{name}= must be an http:// or https:// URL"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(format!("{name}= may not carry user:password@"));
        }
        if !allowlist.iter().any(|re| re.is_match(url.as_str())) {
            return Err(format!(
                "{name}= {url} is not allowed by this bridge (backhaul-backend --allowlist)"
            ));
        }
        Ok(url)
    };
    let frame = frame.ok_or("no f=<frame URL> given")?;
    Ok(Target {
        frame: check("f", frame)?,
        disconnect: disconnect.map(|d| check("d", d)).transpose()?,
    })
}

/// Whether a request is a callback: the last path segment is a session's UUID.
pub fn callback_id(path: &str) -> Option<Uuid> {
    let last = path.rsplit('/').next()?;
    Uuid::try_parse(last).ok()
}

/// Whether an answer is worth another try: the application may get better.
fn retryable(status: StatusCode) -> bool {
    status.is_server_error() && status != StatusCode::NOT_IMPLEMENTED
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
}

type Sink = WsWriter<WriteHalf<TokioIo<Upgraded>>>;

/// What a session's writer sends its client, in the order queued.
enum Out {
    /// A callback's message; `done` hears whether it was written.
    Message {
        text: bool,
        body: Bytes,
        done: oneshot::Sender<bool>,
    },
    Pong(Bytes),
    /// The last frame: nothing is written after it.
    Close(Option<(u16, String)>),
}

/// The sending side of a live session, reachable through its callback URL.
struct Callbacks {
    out: mpsc::Sender<Out>,
    waiting: Semaphore,
    delivered: AtomicU64,
}

/// The bridge of one backend: its settings and its live sessions by callback UUID.
pub struct Bridge {
    settings: Settings,
    sessions: Mutex<HashMap<Uuid, Arc<Callbacks>>>,
}

/// How a session ended, for the client's Close, the disconnect POST and the log.
#[derive(Debug, Clone)]
enum Ending {
    /// The client closed, with this code and reason (`None`: no code).
    Client(Option<(u16, String)>),
    /// We closed: the application failed, or the client broke the rules.
    Closed(u16, String),
    /// The connection dropped without a Close.
    Dropped(String),
}

impl Ending {
    /// The Close we send, if any.
    fn reply(&self) -> Option<Option<(u16, String)>> {
        match self {
            Ending::Client(Some((code, _))) if is_sendable_close_code(*code) => {
                Some(Some((*code, String::new())))
            }
            Ending::Client(Some(_)) => Some(Some((1000, String::new()))),
            Ending::Client(None) => Some(None),
            Ending::Closed(code, reason) => Some(Some((*code, reason.clone()))),
            Ending::Dropped(_) => None,
        }
    }

    /// The code and reason the disconnect POST reports.
    fn report(&self) -> (Option<u16>, String) {
        match self {
            Ending::Client(Some((code, reason))) => (Some(*code), reason.clone()),
            Ending::Client(None) => (None, String::new()),
            Ending::Closed(code, reason) => (Some(*code), reason.clone()),
            Ending::Dropped(why) => (Some(1006), why.clone()),
        }
    }
}

impl std::fmt::Display for Ending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ending::Client(Some((code, r))) if r.is_empty() => write!(f, "client closed ({code})"),
            Ending::Client(Some((code, r))) => write!(f, "client closed ({code}: {r})"),
            Ending::Client(None) => write!(f, "client closed"),
            Ending::Closed(code, r) => write!(f, "closed by the bridge ({code}: {r})"),
            Ending::Dropped(why) => write!(f, "dropped: {why}"),
        }
    }
}

/// Writes what `out` queues to the client until a Close, a write error, a write that does not
/// finish within [`WRITE_STALL`] (a client that stopped reading), or `stop`. A write is never
/// cut half-way and followed by another frame: after a stall the connection is shut down.
async fn write_loop(mut sink: Sink, mut out: mpsc::Receiver<Out>, stop: CancellationToken) {
    loop {
        let next = tokio::select! {
            biased;
            next = out.recv() => next,
            _ = stop.cancelled() => None,
        };
        let Some(next) = next else { break };
        let (written, last) = match next {
            Out::Message { text, body, done } => {
                let ok = matches!(
                    tokio::time::timeout(WRITE_STALL, sink.data(text, true, &body)).await,
                    Ok(Ok(()))
                );
                let _ = done.send(ok);
                (ok, false)
            }
            Out::Pong(p) => {
                let w = tokio::time::timeout(WRITE_STALL, sink.pong(&p)).await;
                (matches!(w, Ok(Ok(()))), false)
            }
            Out::Close(c) => {
                let c = c.as_ref().map(|(code, r)| (*code, r.as_str()));
                let w = tokio::time::timeout(WRITE_STALL, sink.close(c)).await;
                (matches!(w, Ok(Ok(()))), true)
            }
        };
        if !written {
            debug!("the client did not take a frame within {WRITE_STALL:?}, or the write failed; dropping the connection");
            break;
        }
        if last {
            break;
        }
    }
    // Whatever is still queued was not written: its callers hear so when `out` is dropped.
    drop(out);
    let _ = tokio::time::timeout(CLOSE_WAIT, sink.shutdown()).await;
}

/// Removes a session from the callback table when it ends, however it ends.
struct Registered<'a> {
    bridge: &'a Bridge,
    id: Uuid,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.bridge.table().remove(&self.id);
    }
}

/// The reason a client gets for 1014. What failed is in the backend's log, not in the reason,
/// so a client cannot map the private network by the errors it gets back.
pub const APP_FAILED_REASON: &str =
    "the application did not take the message (backhaul-backend's log says why)";

impl Bridge {
    pub fn new(settings: Settings) -> Arc<Self> {
        Arc::new(Self {
            settings,
            sessions: Mutex::new(HashMap::new()),
        })
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Arc<Callbacks>>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Live sessions (for tests and the shutdown log).
    pub fn live_sessions(&self) -> usize {
        self.table().len()
    }

    /// Carries one session, whose handshake asked for `path`, until it ends.
    pub async fn session(&self, ws: TokioIo<Upgraded>, path: &str, forwarded_for: Option<String>) {
        let (r, w) = tokio::io::split(ws);
        let mut reader = WsReader::new(r, Role::Server, self.settings.max_message as u64);
        let mut sink = WsWriter::new(w, Role::Server);
        let target = match parse_target(path, &self.settings.allowlist) {
            Ok(t) => t,
            Err(reason) => {
                warn!("refused a bridge session: {reason}");
                let _ =
                    tokio::time::timeout(WRITE_STALL, sink.close(Some((CLOSE_REFUSED, &reason))))
                        .await;
                reader.drain(CLOSE_WAIT).await;
                return;
            }
        };
        let id = Uuid::new_v4();
        let callback = format!("{}/{id}", self.settings.base_url);
        let (out, out_rx) = mpsc::channel(MAX_WAITING_CALLBACKS + 4);
        let stop = CancellationToken::new();
        let writer = write_loop(sink, out_rx, stop.clone());
        let callbacks = Arc::new(Callbacks {
            out: out.clone(),
            waiting: Semaphore::new(MAX_WAITING_CALLBACKS),
            delivered: AtomicU64::new(0),
        });
        self.table().insert(id, callbacks.clone());
        let registered = Registered { bridge: self, id };
        debug!(callback = %callback, "bridge session open, frames to {}", target.frame);
        let post = Poster {
            settings: &self.settings,
            callback: &callback,
            forwarded_for: forwarded_for.as_deref(),
        };
        let started = Instant::now();
        let sent = AtomicU64::new(0);
        let bytes_sent = AtomicU64::new(0);
        let run = async {
            let ending = {
                // Whole messages, one waiting while the one before is posted: the client's bytes
                // wait in the stack's flow-control windows, not here.
                let (messages, mut queued) = mpsc::channel::<(bool, Bytes)>(1);
                let reading = read_loop(&mut reader, &out, messages, self.settings.max_message);
                let posting = async {
                    while let Some((text, body)) = queued.recv().await {
                        let seq = sent.fetch_add(1, Relaxed) + 1;
                        bytes_sent.fetch_add(body.len() as u64, Relaxed);
                        let kind = if text { TEXT_TYPE } else { BINARY_TYPE };
                        post.send(&target.frame, Some(seq), kind, body).await?;
                    }
                    Ok::<(), String>(())
                };
                tokio::pin!(reading, posting);
                tokio::select! {
                    ending = &mut reading => {
                        // Answer the client now; the messages it sent before its Close still go
                        // to the application, in order, before the disconnect POST.
                        if let Some(close) = ending.reply() {
                            let _ = out.send(Out::Close(close)).await;
                        }
                        drop(registered);
                        if let Err(why) = posting.await {
                            warn!("the application did not take a message the client sent before closing: {why}");
                        }
                        ending
                    }
                    failed = &mut posting => {
                        let why = failed.err().unwrap_or_default();
                        warn!("closing the session with {CLOSE_APP_FAILED}: {why}");
                        let ending = Ending::Closed(CLOSE_APP_FAILED, APP_FAILED_REASON.to_string());
                        drop(registered);
                        if let Some(close) = ending.reply() {
                            let _ = out.send(Out::Close(close)).await;
                        }
                        ending
                    }
                }
            };
            drop(out);
            let (code, reason) = ending.report();
            let disconnect = async {
                if let Some(url) = &target.disconnect {
                    let extra = code.map(|c| (CLOSE_CODE_HEADER, c.to_string()));
                    if let Err(why) = post
                        .send_with(url, None, TEXT_TYPE, Bytes::from(reason), extra)
                        .await
                    {
                        warn!("the disconnect POST failed: {why}");
                    }
                }
            };
            // The client's Close answer and the disconnect POST go on together.
            tokio::join!(disconnect, async {
                if matches!(ending, Ending::Closed(..)) {
                    reader.drain(CLOSE_WAIT).await;
                }
            });
            stop.cancel();
            ending
        };
        let (ending, ()) = tokio::join!(run, writer);
        info!(
            messages.to_app = sent.load(Relaxed),
            bytes.to_app = bytes_sent.load(Relaxed),
            messages.from_app = callbacks.delivered.load(Relaxed),
            duration_ms = started.elapsed().as_millis() as u64,
            "bridge session ended: {ending}"
        );
    }

    /// Answers a callback POST: the body becomes one message to the session's client.
    pub async fn callback(&self, req: Request<Incoming>) -> Response<crate::Body> {
        let Some(id) = callback_id(req.uri().path()) else {
            return answer(StatusCode::NOT_FOUND, "no such path on this bridge");
        };
        if req.method() != http::Method::POST {
            let mut resp = answer(
                StatusCode::METHOD_NOT_ALLOWED,
                "POST a message to a callback URL",
            );
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
            return resp;
        }
        let Some(session) = self.table().get(&id).cloned() else {
            return answer(
                StatusCode::NOT_FOUND,
                "no live session at this callback URL (it ended, or never existed)",
            );
        };
        let Ok(_turn) = session.waiting.try_acquire() else {
            let mut resp = answer(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many messages waiting for this session's client; try again",
            );
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return resp;
        };
        let max = self.settings.max_message;
        let text = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("text/"));
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max as u64) {
            return too_big(max);
        }
        let body = http_body_util::Limited::new(req.into_body(), max);
        let body = match tokio::time::timeout(CALLBACK_BODY_TIMEOUT, body.collect()).await {
            Ok(Ok(b)) => b.to_bytes(),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return too_big(max),
            Ok(Err(e)) => {
                debug!("a callback's body failed: {e}");
                return answer(StatusCode::BAD_REQUEST, "the body could not be read");
            }
            Err(_) => {
                return answer(
                    StatusCode::REQUEST_TIMEOUT,
                    "the body took longer than 30 s to arrive",
                )
            }
        };
        if text && std::str::from_utf8(&body).is_err() {
            return answer(
                StatusCode::BAD_REQUEST,
                "a text/* body must be UTF-8 (send other bytes as application/octet-stream)",
            );
        }
        let (done, written) = oneshot::channel();
        let queued = session.out.send(Out::Message { text, body, done }).await;
        if queued.is_ok() && written.await == Ok(true) {
            session.delivered.fetch_add(1, Relaxed);
            let mut resp = answer(StatusCode::NO_CONTENT, "");
            *resp.body_mut() = crate::Body::default();
            resp.headers_mut().remove(header::CONNECTION);
            return resp;
        }
        answer(
            StatusCode::NOT_FOUND,
            "the session ended before the message could be sent",
        )
    }
}

/// Reads the client's frames: whole messages go to `messages` (waiting while it is full),
/// pings are answered through `out`. Returns how the client's side ended.
async fn read_loop<R: tokio::io::AsyncRead + Unpin + Send>(
    reader: &mut WsReader<R>,
    out: &mpsc::Sender<Out>,
    messages: mpsc::Sender<(bool, Bytes)>,
    max_message: usize,
) -> Ending {
    let mut message = BytesMut::new();
    let mut message_text = None;
    loop {
        let event = match reader.next(max_message).await {
            Ok(ev) => ev,
            Err(WsError::Eof) => {
                return Ending::Dropped("the connection ended without a Close".into())
            }
            Err(WsError::Io(e)) => return Ending::Dropped(format!("read failed: {e}")),
            Err(e) => return Ending::Closed(e.close_code().unwrap_or(1002), e.to_string()),
        };
        match event {
            Event::Data { text, fin, payload } => {
                let text = *message_text.get_or_insert(text);
                message.extend_from_slice(&payload);
                if !fin {
                    continue;
                }
                message_text = None;
                let body = message.split().freeze();
                if text && std::str::from_utf8(&body).is_err() {
                    return Ending::Closed(1007, "a text message that is not UTF-8".into());
                }
                if messages.send((text, body)).await.is_err() {
                    // The poster stopped: the application failed, and the caller closes.
                    return Ending::Dropped("the application failed".into());
                }
            }
            Event::Ping(p) => {
                let _ = out.send(Out::Pong(p)).await;
            }
            Event::Pong(_) => {}
            Event::Close(close) => return Ending::Client(close),
        }
    }
}

/// An answer to a callback. Refusals close the connection, so a caller holds no connection
/// (and no share of `--max-sessions`) by sending requests that fail.
fn answer(status: StatusCode, msg: &str) -> Response<crate::Body> {
    let mut resp = Response::new(crate::Body::from(format!("{msg}\n")));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(TEXT_TYPE));
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

fn too_big(max: usize) -> Response<crate::Body> {
    answer(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("a message is at most {max} bytes (backhaul-backend --max-message-kib)"),
    )
}

/// POSTs to the application on behalf of one session.
struct Poster<'a> {
    settings: &'a Settings,
    callback: &'a str,
    forwarded_for: Option<&'a str>,
}

impl Poster<'_> {
    async fn send(
        &self,
        url: &Url,
        seq: Option<u64>,
        kind: &str,
        body: Bytes,
    ) -> Result<(), String> {
        self.send_with(url, seq, kind, body, None).await
    }

    /// POSTs `body` to `url`, trying again on failures that may pass (no answer, 5xx, 408,
    /// 429) up to the configured attempts; the error says what the last attempt got.
    async fn send_with(
        &self,
        url: &Url,
        seq: Option<u64>,
        kind: &str,
        body: Bytes,
        extra: Option<(&str, String)>,
    ) -> Result<(), String> {
        let attempts = self.settings.attempts.max(1);
        let mut delay = FIRST_RETRY_DELAY;
        let mut last = String::new();
        for attempt in 1..=attempts {
            if attempt > 1 {
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            let mut req = self
                .settings
                .client
                .post(url.clone())
                .timeout(self.settings.post_timeout)
                .header(CALLBACK_HEADER, self.callback)
                .header(header::CONTENT_TYPE, kind)
                .body(body.clone());
            if let Some(seq) = seq {
                req = req.header(SEQ_HEADER, seq);
            }
            if let Some(ff) = self.forwarded_for {
                req = req.header("x-forwarded-for", ff);
            }
            if let Some((name, value)) = &extra {
                req = req.header(*name, value);
            }
            match req.send().await {
                Ok(mut resp) => {
                    let status = resp.status();
                    // Read a short answer through so the connection can serve the next POST.
                    let mut read = 0;
                    while read < MAX_ANSWER_READ {
                        match resp.chunk().await {
                            Ok(Some(c)) => read += c.len(),
                            _ => break,
                        }
                    }
                    if status.is_success() {
                        return Ok(());
                    }
                    if status.is_redirection() {
                        return Err(format!(
                            "the application at {url} answered {status}; the bridge follows no redirects (one could lead outside --allowlist)"
                        ));
                    }
                    if !retryable(status) {
                        return Err(format!(
                            "the application at {url} refused the message: {status}"
                        ));
                    }
                    last = format!("answered {status}");
                }
                Err(e) if e.is_timeout() => {
                    last = format!("no answer within {:?}", self.settings.post_timeout)
                }
                Err(e) => last = backhaul_common::describe_error(&e),
            }
            debug!("POST to {url} failed (attempt {attempt} of {attempts}): {last}");
        }
        Err(format!(
            "the application at {url} failed {attempts} times; last: {last}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow(p: &[&str]) -> Vec<Regex> {
        compile_allowlist(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn connect_paths_name_allowed_urls() {
        let list = allow(&[r"http://app\.internal:8080/.*"]);
        let t = parse_target(
            "/connect?f=http://app.internal:8080/frame&d=http%3A%2F%2Fapp.internal%3A8080%2Fbye",
            &list,
        )
        .unwrap();
        assert_eq!(t.frame.as_str(), "http://app.internal:8080/frame");
        assert_eq!(
            t.disconnect.unwrap().as_str(),
            "http://app.internal:8080/bye"
        );
        let t = parse_target("/base/connect?f=http://app.internal:8080/f", &list).unwrap();
        assert_eq!(t.disconnect, None);
    }

    #[test]
    fn what_the_allowlist_does_not_match_is_refused() {
        let list = allow(&[r"http://app\.internal:8080/.*"]);
        for (path, why) in [
            ("/connect?f=http://evil.example/frame", "not allowed"),
            // Anchored: a URL that merely contains an allowed one does not pass.
            (
                "/connect?f=http://evil.example/?http://app.internal:8080/x",
                "not allowed",
            ),
            (
                "/connect?f=http://app.internal:8080.evil.example/",
                "not a URL",
            ),
            (
                "/connect?f=http://app.internal:8080@evil.example/",
                "user:password",
            ),
            (
                "/connect?f=http://app.internal:8080/f&d=http://evil.example/",
                "d= http://evil",
            ),
            (
                "/connect?f=ftp://app.internal:8080/f",
                "http:// or https://",
            ),
            ("/connect?f=http://u:p@app.internal:8080/f", "user:password"),
            (
                "/connect?f=http://app.internal:8080/a&f=http://app.internal:8080/b",
                "twice",
            ),
            ("/connect?d=http://app.internal:8080/f", "no f="),
            ("/connect?f=not a url", "not a URL"),
            ("/other?f=http://app.internal:8080/f", "serves /connect"),
        ] {
            let e = parse_target(path, &list).unwrap_err();
            assert!(e.contains(why), "{path}: {e}");
        }
        // No allowlist: everything refused.
        let e = parse_target("/connect?f=http://app.internal:8080/f", &[]).unwrap_err();
        assert!(e.contains("not allowed"), "{e}");
        assert!(compile_allowlist(&["(".to_string()]).is_err());
    }

    #[test]
    fn callbacks_are_named_by_their_last_segment() {
        let id = Uuid::new_v4();
        assert_eq!(callback_id(&format!("/{id}")), Some(id));
        assert_eq!(callback_id(&format!("/bridge/{id}")), Some(id));
        assert_eq!(callback_id("/connect"), None);
        assert_eq!(callback_id(&format!("/{id}/x")), None);
    }

    #[test]
    fn only_failures_that_may_pass_are_retried() {
        assert!(retryable(StatusCode::SERVICE_UNAVAILABLE));
        assert!(retryable(StatusCode::INTERNAL_SERVER_ERROR));
        assert!(retryable(StatusCode::TOO_MANY_REQUESTS));
        assert!(!retryable(StatusCode::NOT_IMPLEMENTED));
        assert!(!retryable(StatusCode::NOT_FOUND));
        assert!(!retryable(StatusCode::FORBIDDEN));
    }
}
