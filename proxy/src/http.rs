//! The relay's HTTP surface: frontends' WebSocket upgrades under `/b/<id>`, the agent API under
//! `/agent/v1/links`, and `/healthz`. Handlers translate between HTTP and the [`Hub`].

use crate::auth::{Auth, Refusal};
use crate::expose::ExposeError;
use crate::hub::{Hub, HubError, Pushed, RelaySession, Transport};
use crate::metrics::Refused;
use backhaul_common::api::{self, Hello, OpenRequest, Opened, LINKS_PATH, PROTOCOL_VERSION};
use backhaul_common::metrics::observe;
use backhaul_common::secret::{self, SecretHash};
use backhaul_common::session::{pump, FrameSink, WsSide};
use backhaul_common::transport::ChunkSource;
use backhaul_common::wire::{Batch, BatchReader, Frame, Kind};
use backhaul_common::ws::{switching_protocols, websocket_key, Role};
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

/// Largest registration body accepted.
const MAX_HELLO_BYTES: usize = 16 * 1024;

pub type Body = BoxBody<Bytes, std::convert::Infallible>;

pub(crate) fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

/// What every request handler can reach.
pub struct Ctx {
    pub hub: Arc<Hub>,
    pub auth: Arc<Auth>,
    /// How long a registration body may take to arrive (the first-request deadline).
    pub body_timeout: Duration,
    pub sessions: TaskTracker,
    /// Whether clients reach us over TLS (for `X-Forwarded-Proto`).
    pub secure: bool,
    /// Exposed ports, when the relay offers them (`--expose-ports`).
    pub exposer: Option<Arc<crate::expose::Exposer>>,
    /// Who may read `/metrics` and `/status`.
    pub admin: crate::AdminAccess,
    /// Cancelled when the relay starts draining: `/readyz` then answers 503.
    pub draining: CancellationToken,
}

impl Ctx {
    /// Counts a refusal for `/metrics` and the status page, and logs `line` at WARN at a
    /// bounded rate.
    pub(crate) fn refuse(&self, why: Refused, line: String) {
        self.hub.metrics.refused(why, || line.clone());
        self.auth.log_refusal(|| line);
    }
}

fn text(status: StatusCode, msg: impl Into<String>) -> Response<Body> {
    let mut body = msg.into();
    body.push('\n');
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn batch(body: Batch) -> Response<Body> {
    let mut resp = Response::new(PartsBody::new(body).boxed());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(api::BATCH_CONTENT_TYPE),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// A long-poll answer: a batch's parts, of a length known up front, which hyper writes with
/// vectored writes instead of one joined buffer.
struct PartsBody {
    parts: std::collections::VecDeque<Bytes>,
    left: u64,
}

impl PartsBody {
    fn new(b: Batch) -> Self {
        Self {
            left: b.len() as u64,
            parts: b.into_parts().into(),
        }
    }
}

impl http_body::Body for PartsBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let part = self.parts.pop_front();
        if let Some(p) = &part {
            self.left -= p.len() as u64;
        }
        std::task::Poll::Ready(part.map(|p| Ok(http_body::Frame::data(p))))
    }

    fn is_end_stream(&self) -> bool {
        self.parts.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.left)
    }
}

fn hub_error(e: HubError) -> Response<Body> {
    let status = match &e {
        HubError::NoAgent(_)
        | HubError::PendingFull(..)
        | HubError::TooManySessions(_)
        | HubError::BackendFull(..) => StatusCode::SERVICE_UNAVAILABLE,
        HubError::ClientFull(_) => StatusCode::TOO_MANY_REQUESTS,
        HubError::UnknownLink(_) => StatusCode::NOT_FOUND,
        HubError::WrongCredential(_) => StatusCode::UNAUTHORIZED,
        HubError::Protocol { .. } => StatusCode::BAD_REQUEST,
    };
    text(status, e.to_string())
}

/// The answer to a failed poll or push; a protocol error also ends the agent's link.
fn link_error(hub: &Hub, link: &Arc<crate::hub::Link>, e: HubError) -> Response<Body> {
    if matches!(e, HubError::Protocol { .. }) {
        warn!("{e}");
        hub.kill_link(link, 1011, "the agent broke the protocol");
    }
    hub_error(e)
}

/// Routes one request.
pub async fn handle(
    ctx: Arc<Ctx>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let path = req.uri().path().to_string();
    let resp = if path == "/healthz" {
        text(
            StatusCode::OK,
            format!("ok ({} agent links)", ctx.hub.link_count()),
        )
    } else if path == "/readyz" {
        if ctx.draining.is_cancelled() {
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                "draining: shutting down, send no new sessions here",
            )
        } else {
            text(StatusCode::OK, "ready")
        }
    } else if path == "/metrics" || path == "/status" {
        match admin_refusal(&ctx, peer, &req) {
            Some(refused) => refused,
            None if path == "/metrics" => {
                let mut resp = Response::new(full(ctx.hub.scrape()));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(backhaul_common::metrics::CONTENT_TYPE),
                );
                resp
            }
            None => crate::status::page(&ctx.hub),
        }
    } else if let Some((backend, rest)) = api::split_session_path(&path) {
        let backend = backend.to_string();
        let rest = rest.to_string();
        let policy = ctx.auth.policy();
        match policy.client(&backend, secret::presented(req.headers())) {
            Ok(()) => frontend_session(ctx, peer, req, backend, rest).await,
            Err(why) => {
                let line = format!("refused a session to backend '{backend}' from {peer}: {why}");
                ctx.refuse(Refused::ClientCredential, line);
                unauthorized(why, Party::Client)
            }
        }
    } else if path == LINKS_PATH || path.starts_with(&format!("{LINKS_PATH}/")) {
        agent_api(ctx, peer, req, &path).await
    } else {
        text(
            StatusCode::NOT_FOUND,
            format!(
                "nothing at {path}; frontends connect to /b/<backend-id>, agents to {LINKS_PATH}"
            ),
        )
    };
    Ok(resp)
}

/// The 401 for a refused agent or client. It does not say whether the backend ID exists.
/// Who was refused.
#[derive(Clone, Copy)]
enum Party {
    Agent,
    Client,
}

fn unauthorized(why: Refusal, party: Party) -> Response<Body> {
    let msg = match (why, party) {
        (Refusal::Missing, Party::Agent) => "this relay requires an agent credential: give the agent its backend's secret (--agent-token or --agent-token-file)",
        (_, Party::Agent) => "the agent's credential is not valid for this backend ID; check --agent-token and --backend-id against the relay's credentials",
        (Refusal::Missing, Party::Client) => "this relay requires a client credential: give the frontend --client-token or --client-token-file",
        (_, Party::Client) => "the client credential is not valid for this backend ID; check --client-token and the backend ID",
    };
    let mut resp = text(StatusCode::UNAUTHORIZED, msg);
    resp.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    resp
}

/// Enters `id` for a request that must carry the link's credential; refusals are logged.
fn enter_link(
    ctx: &Ctx,
    peer: SocketAddr,
    req: &Request<Incoming>,
    id: &str,
) -> Result<(Arc<crate::hub::Link>, crate::hub::InFlight), Box<Response<Body>>> {
    ctx.hub
        .enter(id, secret::presented(req.headers()))
        .map_err(|e| {
            if let HubError::WrongCredential(_) = &e {
                let line = format!("refused a request from {peer}: {e}");
                ctx.refuse(Refused::AgentCredential, line);
            }
            Box::new(hub_error(e))
        })
}

async fn agent_api(
    ctx: Arc<Ctx>,
    peer: SocketAddr,
    req: Request<Incoming>,
    path: &str,
) -> Response<Body> {
    let hub = &ctx.hub;
    let tail = path[LINKS_PATH.len()..].trim_start_matches('/');
    let mut parts = tail.splitn(2, '/');
    let link_id = parts.next().unwrap_or("");
    let action = parts.next().unwrap_or("");
    match (req.method().clone(), link_id, action) {
        (Method::POST, "", "") => {
            let presented = secret::presented(req.headers()).map(str::to_string);
            let body = match read_body(req, MAX_HELLO_BYTES, ctx.body_timeout).await {
                Ok(b) => b,
                Err(resp) => return *resp,
            };
            let hello: Hello = match serde_json::from_slice(&body) {
                Ok(h) => h,
                Err(e) => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        format!("registration body is not a valid hello: {e}"),
                    )
                }
            };
            if hello.protocol != PROTOCOL_VERSION {
                return text(
                    StatusCode::from_u16(426).unwrap_or(StatusCode::BAD_REQUEST),
                    format!(
                        "agent speaks protocol {}, this relay speaks {PROTOCOL_VERSION}; run matching versions of agent and relay",
                        hello.protocol
                    ),
                );
            }
            if let Err(e) = api::validate_backend_id(&hello.backend_id) {
                return text(StatusCode::BAD_REQUEST, e.to_string());
            }
            let credential = match ctx
                .auth
                .policy()
                .agent(&hello.backend_id, presented.as_deref())
            {
                Ok(c) => c,
                Err(why) => {
                    let line = format!(
                        "refused an agent registering for backend '{}' from {peer}: {why}",
                        hello.backend_id
                    );
                    ctx.refuse(Refused::AgentCredential, line);
                    return unauthorized(why, Party::Agent);
                }
            };
            let exposed = match &hello.expose {
                None => {
                    if let Some(x) = &ctx.exposer {
                        x.withdraw(&hello.backend_id);
                    }
                    None
                }
                Some(want) => {
                    let result = match &ctx.exposer {
                        None => Err(ExposeError::NotOffered),
                        Some(x) => x.expose(&ctx, &hello.backend_id, want),
                    };
                    match result {
                        Ok(e) => Some(e),
                        Err(e) => {
                            let line = format!(
                                "refused to expose backend '{}' for the agent at {peer}: {e}",
                                hello.backend_id
                            );
                            ctx.refuse(Refused::ExposeRequest, line);
                            let status = match e {
                                ExposeError::NotOffered => StatusCode::FORBIDDEN,
                                ExposeError::Exhausted(..) => StatusCode::SERVICE_UNAVAILABLE,
                                ExposeError::BadAllowlist(_) => StatusCode::BAD_REQUEST,
                                _ => StatusCode::CONFLICT,
                            };
                            return text(status, format!("cannot expose a port: {e}"));
                        }
                    }
                }
            };
            let link = hub.register(&hello.backend_id, &hello.agent, peer, credential);
            let mut info = hub.link_info(&link.id);
            info.exposed = exposed;
            let mut resp = Response::new(full(serde_json::to_vec(&info).unwrap_or_default()));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp
        }
        (Method::GET, id, "poll") if !id.is_empty() => {
            let (ack, round) = match (
                query_u64(req.uri().query(), "ack"),
                query_u64(req.uri().query(), "round"),
            ) {
                (Some(a), Some(r)) => (a, r),
                _ => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        "poll needs ?ack=<number>&round=<number>",
                    )
                }
            };
            let (link, _guard) = match enter_link(&ctx, peer, &req, id) {
                Ok(l) => l,
                Err(resp) => return *resp,
            };
            hub.note_transport(&link, Transport::LongPoll);
            let started = std::time::Instant::now();
            let answer = match hub.poll(&link, ack, round).await {
                Ok(body) => batch(body),
                Err(e) => link_error(hub, &link, e),
            };
            observe(&hub.metrics.exchange_seconds, "poll", started.elapsed());
            answer
        }
        (Method::POST, id, "push") if !id.is_empty() => {
            let (link, _guard) = match enter_link(&ctx, peer, &req, id) {
                Ok(l) => l,
                Err(resp) => return *resp,
            };
            hub.note_transport(&link, Transport::LongPoll);
            let started = std::time::Instant::now();
            let limit = hub.cfg.max_batch_bytes * 2 + 64 * 1024;
            let answer = match push(hub, &link, req, limit).await {
                Ok(body) => batch(body),
                Err(e) => link_error(hub, &link, e),
            };
            observe(&hub.metrics.exchange_seconds, "push", started.elapsed());
            answer
        }
        (Method::GET, id, "ws") if !id.is_empty() => agent_websocket(&ctx, peer, req, id),
        (Method::POST, id, "stream") if !id.is_empty() => agent_h2_stream(&ctx, peer, req, id),
        (Method::DELETE, id, "") if !id.is_empty() => match enter_link(&ctx, peer, &req, id) {
            Ok((link, _guard)) => {
                hub.kill_link(&link, 1001, "the agent shut down");
                let mut resp = Response::new(full(Bytes::new()));
                *resp.status_mut() = StatusCode::NO_CONTENT;
                resp
            }
            Err(resp) => *resp,
        },
        (m, _, _) => text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{m} {path} is not part of the agent API"),
        ),
    }
}

/// Where a stream starts: the agent's ack from the query, after entering its link.
fn begin_stream(
    ctx: &Ctx,
    peer: SocketAddr,
    req: &Request<Incoming>,
    id: &str,
) -> Result<crate::stream::Start, Box<Response<Body>>> {
    let Some(ack) = query_u64(req.uri().query(), "ack") else {
        return Err(Box::new(text(
            StatusCode::BAD_REQUEST,
            "a stream needs ?ack=<number>",
        )));
    };
    // The agent's batch size after breaks; the stream grows it back as batches go through.
    let max = ctx.hub.cfg.max_batch_bytes;
    let batch = query_u64(req.uri().query(), "batch").map_or(max, |b| {
        (b.min(max as u64) as usize).max(crate::stream::MIN_BATCH.min(max))
    });
    let (link, guard) = enter_link(ctx, peer, req, id)?;
    match ctx.hub.take_over(&link, ack) {
        Ok(generation) => Ok(crate::stream::Start {
            link,
            guard,
            generation,
            from: ack,
            batch,
        }),
        Err(e) => Err(Box::new(link_error(&ctx.hub, &link, e))),
    }
}

/// `GET .../<link>/ws?ack=N` with a WebSocket upgrade: the link's batches, one per message.
fn agent_websocket(
    ctx: &Arc<Ctx>,
    peer: SocketAddr,
    mut req: Request<Incoming>,
    id: &str,
) -> Response<Body> {
    let key = match websocket_key(&req) {
        Some(k) => k,
        None => {
            return text(
                StatusCode::UPGRADE_REQUIRED,
                "this URL carries an agent link over WebSocket; send a WebSocket upgrade",
            )
        }
    };
    let start = match begin_stream(ctx, peer, &req, id) {
        Ok(s) => s,
        Err(resp) => return *resp,
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let hub = ctx.hub.clone();
    ctx.sessions.spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                debug!(
                    link.id = start.link.short_id(),
                    "agent went away during the upgrade: {e}"
                );
                return;
            }
        };
        hub.note_transport(&start.link, Transport::WebSocket);
        let (tx, rx) = backhaul_common::transport::ws_halves(
            TokioIo::new(upgraded),
            Role::Server,
            hub.cfg.max_batch_bytes,
        );
        crate::stream::serve(hub, start, tx, rx, "WebSocket").await;
    });
    switching_protocols(&key, None)
}

/// `POST .../<link>/stream?ack=N` over HTTP/2: the request body streams the agent's batches and
/// the response body the relay's, each batch preceded by its length.
fn agent_h2_stream(
    ctx: &Arc<Ctx>,
    peer: SocketAddr,
    req: Request<Incoming>,
    id: &str,
) -> Response<Body> {
    if req.version() != http::Version::HTTP_2 {
        // Over HTTP/1.1 a proxy may hold a body back until it ends, which would stall the link.
        return text(
            StatusCode::HTTP_VERSION_NOT_SUPPORTED,
            "streaming agent links need HTTP/2; use the long-poll or WebSocket transport",
        );
    }
    let start = match begin_stream(ctx, peer, &req, id) {
        Ok(s) => s,
        Err(resp) => return *resp,
    };
    ctx.hub.note_transport(&start.link, Transport::Http2);
    let (tx, chunks) = backhaul_common::transport::ChannelTx::new();
    let hub = ctx.hub.clone();
    let max_batch = hub.cfg.max_batch_bytes;
    let body = req.into_body();
    ctx.sessions.spawn(async move {
        let rx = backhaul_common::transport::ChunkRx::new(IncomingChunks(body), max_batch);
        crate::stream::serve(hub, start, tx, rx, "HTTP/2").await;
    });
    let frames = futures_util::StreamExt::map(chunks, |b| {
        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(b))
    });
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(frames)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(api::BATCH_STREAM_CONTENT_TYPE),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// A request body as a source of data chunks (trailers carry nothing for us).
struct IncomingChunks(Incoming);

impl ChunkSource for IncomingChunks {
    async fn chunk(&mut self) -> Result<Option<Bytes>, String> {
        loop {
            match self.0.frame().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(e.to_string()),
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        return Ok(Some(data));
                    }
                }
            }
        }
    }
}

/// Reads a push body as it streams in, delivering whole frames at once, and returns the ack.
/// A body cut half-way has still delivered its whole frames; the agent re-sends the rest. A
/// push that overtook an earlier one (the agent keeps several in flight) leaves its body unread
/// until that one has arrived, so the relay never holds frames out of order.
async fn push(
    hub: &Hub,
    link: &Arc<crate::hub::Link>,
    req: Request<Incoming>,
    limit: usize,
) -> Result<Batch, HubError> {
    let mut body = IncomingChunks(req.into_body());
    let mut reader = BatchReader::new();
    let mut received = 0usize;
    loop {
        let data = match body.chunk().await {
            Ok(Some(data)) => data,
            Ok(None) => break,
            Err(e) => {
                debug!(
                    link.id = link.short_id(),
                    "push body cut after {received} bytes: {e}"
                );
                return Ok(hub.push_ack(link));
            }
        };
        received += data.len();
        if received > limit {
            return Err(HubError::Protocol {
                link: link.short_id().to_string(),
                what: format!("push body over {limit} bytes"),
            });
        }
        reader.push(&data);
        if let Pushed::NotYetItsTurn { first_seq } = hub.push_frames(link, &mut reader, true)? {
            if !hub.wait_for_turn(link, first_seq).await {
                debug!(
                    link.id = link.short_id(),
                    "push from frame {first_seq} gave up waiting for the frames before it"
                );
                return Ok(hub.push_ack(link));
            }
            if hub.push_frames(link, &mut reader, true)? != Pushed::Taken {
                return Ok(hub.push_ack(link));
            }
        }
    }
    reader.finish().map_err(|e| HubError::Protocol {
        link: link.short_id().to_string(),
        what: e.to_string(),
    })?;
    Ok(hub.push_ack(link))
}

async fn read_body(
    req: Request<Incoming>,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, Box<Response<Body>>> {
    let read = tokio::time::timeout(timeout, Limited::new(req.into_body(), limit).collect());
    let Ok(result) = read.await else {
        return Err(Box::new(text(
            StatusCode::REQUEST_TIMEOUT,
            format!("request body did not arrive within {timeout:?}"),
        )));
    };
    match result {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) => {
            if e.is::<http_body_util::LengthLimitError>() {
                Err(Box::new(text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body over the limit of {limit} bytes"),
                )))
            } else {
                // The connection broke mid-body; the agent will retry.
                Err(Box::new(text(
                    StatusCode::BAD_REQUEST,
                    format!("request body could not be read: {e}"),
                )))
            }
        }
    }
}

fn query_u64(query: Option<&str>, key: &str) -> Option<u64> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.parse().ok()).flatten()
    })
}

/// Ends a session that never got its WebSocket (the client left, or the backend refused), unless
/// disarmed because the session task took over.
struct Unstarted {
    hub: Arc<Hub>,
    session: Option<Arc<RelaySession>>,
}

impl Drop for Unstarted {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            // If an agent already holds it, tell it the client is gone.
            FrameSink::send(
                &*session,
                Frame::close(session.id, 1001, "client went away"),
            );
            self.hub.close_session(&session);
        }
    }
}

/// The handshake headers that reach the backend: the client's [`api::FORWARDED_HEADERS`]
/// (`Authorization` only when it is not the relay's own credential) and `X-Forwarded-For`,
/// `-Proto` and `-Host` saying who connected and how, as the relay saw it.
fn forwarded_headers(
    req: &Request<Incoming>,
    peer: SocketAddr,
    secure: bool,
    pass_authorization: bool,
) -> Vec<(String, String)> {
    let h = req.headers();
    let value = |name: &str| h.get(name).and_then(|v| v.to_str().ok());
    let mut out: Vec<(String, String)> = api::FORWARDED_HEADERS
        .iter()
        .filter(|n| !n.starts_with("x-forwarded-"))
        .filter(|n| pass_authorization || **n != "authorization")
        .flat_map(|n| {
            h.get_all(*n)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .map(|v| (n.to_string(), v.to_string()))
        })
        .collect();
    let xff = match value("x-forwarded-for") {
        Some(prior) => format!("{prior}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    out.push(("x-forwarded-for".into(), xff));
    out.push((
        "x-forwarded-proto".into(),
        if secure { "https" } else { "http" }.into(),
    ));
    if let Some(host) = value("host") {
        out.push(("x-forwarded-host".into(), host.to_string()));
    }
    out
}

/// Accepts a frontend's WebSocket for `backend` and runs its session.
async fn frontend_session(
    ctx: Arc<Ctx>,
    peer: SocketAddr,
    mut req: Request<Incoming>,
    backend: String,
    rest: String,
) -> Response<Body> {
    if let Err(e) = api::validate_backend_id(&backend) {
        return text(StatusCode::BAD_REQUEST, e.to_string());
    }
    let Some(key) = websocket_key(&req) else {
        return text(
            StatusCode::UPGRADE_REQUIRED,
            format!("/b/{backend} carries WebSocket sessions; connect with a WebSocket client such as backhaul-frontend"),
        );
    };
    let protocols: Vec<String> = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect();
    if protocols.len() > api::MAX_PROTOCOLS
        || protocols.iter().map(String::len).sum::<usize>() > api::MAX_PROTOCOL_BYTES
    {
        return text(
            StatusCode::BAD_REQUEST,
            format!(
                "at most {} subprotocols of {} bytes in all may be offered",
                api::MAX_PROTOCOLS,
                api::MAX_PROTOCOL_BYTES
            ),
        );
    }
    let path = match req.uri().query() {
        Some(q) => format!("{rest}?{q}"),
        None => rest,
    };
    if let Err(e) = api::validate_session_path(&path) {
        let status = match e {
            api::BadSessionPath::TooLong(_) => StatusCode::URI_TOO_LONG,
            _ => StatusCode::BAD_REQUEST,
        };
        return text(status, e.to_string());
    }
    let pass_authorization = !ctx.auth.policy().consumes_client_authorization(&backend);
    let headers = forwarded_headers(&req, peer, ctx.secure, pass_authorization);
    let header_bytes: usize = headers.iter().map(|(n, v)| n.len() + v.len()).sum();
    if header_bytes > api::MAX_OPEN_HEADER_BYTES {
        return text(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!(
                "the headers passed to the backend (Cookie, Origin, ...) come to {header_bytes} bytes; at most {} are carried",
                api::MAX_OPEN_HEADER_BYTES
            ),
        );
    }
    let open = OpenRequest {
        path,
        headers,
        protocols,
        client_addr: Some(peer.to_string()),
    };
    let offered = open.protocols.clone();
    let cap = ctx.auth.policy().max_sessions(&backend);
    let (session, session_peer, accepted) =
        match ctx
            .hub
            .open_session(&backend, &open, crate::conn::client_key(peer.ip()), cap)
        {
            Ok(s) => s,
            Err(e) => {
                match e {
                    HubError::ClientFull(_) | HubError::BackendFull(..) => {
                        ctx.auth.log_refusal(|| {
                            format!("refused a session to backend '{backend}' from {peer}: {e}")
                        })
                    }
                    _ => info!(backend.id = %backend, client.addr = %peer, "refused session: {e}"),
                }
                return hub_error(e);
            }
        };
    let mut unstarted = Unstarted {
        hub: ctx.hub.clone(),
        session: Some(session.clone()),
    };
    // With subprotocols offered, the upgrade must carry the backend's choice: wait for it.
    let mut chosen = None;
    if let Some(accepted) = accepted {
        let timeout = ctx.hub.cfg.open_timeout;
        match tokio::time::timeout(timeout, accepted).await {
            Ok(Ok(f)) if f.kind == Kind::Opened => {
                chosen = serde_json::from_slice::<Opened>(&f.payload)
                    .ok()
                    .and_then(|o| o.protocol)
                    .filter(|p| offered.contains(p));
            }
            Ok(Ok(f)) => {
                let reason = f
                    .close_parts()
                    .ok()
                    .flatten()
                    .map(|(_, r)| r)
                    .unwrap_or_default();
                info!(
                    session.id = session.id,
                    "backend refused the session: {reason}"
                );
                return text(
                    StatusCode::BAD_GATEWAY,
                    format!("backend '{backend}' refused the session: {reason}"),
                );
            }
            _ => {
                return text(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "no agent for backend '{backend}' accepted the session within {timeout:?}"
                    ),
                );
            }
        }
    }
    unstarted.session = None;
    let on_upgrade = hyper::upgrade::on(&mut req);
    let span = tracing::info_span!("session", session.id = session.id, backend.id = %backend, client.addr = %peer);
    let hub = ctx.hub.clone();
    ctx.sessions.spawn(
        async move {
            let upgraded = match on_upgrade.await {
                Ok(u) => u,
                Err(e) => {
                    debug!("client went away during the upgrade: {e}");
                    hub.close_session(&session);
                    return;
                }
            };
            let side = WsSide {
                role: Role::Server,
                max_message: hub.cfg.max_message,
            };
            let pumped = pump(TokioIo::new(upgraded), side, session_peer, session.clone());
            carry_session(&hub, session, pumped).await;
        }
        .instrument(span),
    );

    switching_protocols(&key, chosen)
}

/// Runs a session's pump to its end (ending the session if no agent takes it within the open
/// timeout), then closes it in the hub and logs how it ended. For frontends' WebSockets and
/// exposed ports' TCP clients alike.
pub(crate) async fn carry_session(
    hub: &Hub,
    session: Arc<RelaySession>,
    pumped: impl std::future::Future<Output = backhaul_common::session::Summary>,
) {
    let started = std::time::Instant::now();
    let summary = tokio::select! {
        s = pumped => s,
        _ = expire_unclaimed(session.clone(), hub.cfg.open_timeout) => {
            unreachable!("expiry never completes")
        }
    };
    hub.close_session(&session);
    hub.metrics
        .session_ended(&session.backend, summary.sent, summary.received);
    info!(
        bytes.up = summary.sent,
        bytes.down = summary.received,
        duration_ms = started.elapsed().as_millis() as u64,
        "session ended: {}",
        summary.ending
    );
}

/// Ends `session` if no agent has taken it within `timeout`; never completes, so it runs beside
/// the session's pump and ends with it.
async fn expire_unclaimed(session: Arc<RelaySession>, timeout: Duration) {
    tokio::time::sleep(timeout).await;
    let reason = format!(
        "no agent for backend '{}' took the session within {timeout:?}",
        session.backend
    );
    if session.expire(&reason) {
        warn!("{reason}");
    }
    std::future::pending::<()>().await
}

/// `None` when the request may see `/metrics` and `/status`: it carries the admin token, or
/// comes from loopback with `--admin-loopback`. Otherwise the refusal to send.
fn admin_refusal(ctx: &Ctx, peer: SocketAddr, req: &Request<Incoming>) -> Option<Response<Body>> {
    let refuse = |status, msg: &str| {
        ctx.hub.metrics.refused(Refused::Admin, || {
            format!("refused {} from {peer}: {msg}", req.uri().path())
        });
        let mut resp = text(status, msg);
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        Some(resp)
    };
    match &ctx.admin {
        crate::AdminAccess::Loopback if peer.ip().to_canonical().is_loopback() => None,
        crate::AdminAccess::Off | crate::AdminAccess::Loopback => refuse(
            StatusCode::FORBIDDEN,
            "/metrics and /status need the relay's --admin-token-file (or --admin-loopback, for requests from this host only)",
        ),
        crate::AdminAccess::Token(want) => {
            let ok = secret::presented(req.headers())
                .is_some_and(|p| SecretHash::of(p.as_bytes()).matches(want));
            if ok {
                None
            } else {
                refuse(
                    StatusCode::UNAUTHORIZED,
                    "send the relay's admin token: Authorization: Bearer <--admin-token>",
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parsing() {
        assert_eq!(query_u64(Some("ack=5"), "ack"), Some(5));
        assert_eq!(
            query_u64(Some("x=1&ack=18446744073709551615"), "ack"),
            Some(u64::MAX)
        );
        assert_eq!(query_u64(Some("ack=-1"), "ack"), None);
        assert_eq!(query_u64(None, "ack"), None);
    }
}
