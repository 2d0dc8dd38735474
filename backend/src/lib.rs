//! backhaul-backend: a WebSocket server at the private end of the stack. Each WebSocket session
//! becomes one TCP connection to the target service (see `common::bridge` for the convention),
//! or, with `--http-bridge`, a series of HTTP POSTs to an application ([`http_bridge`]).
//! Handshakes are admitted by [`admission`]: the agent's secret, and the client's `Origin`.
#![forbid(unsafe_code)]

pub mod admission;
pub mod http_bridge;

use admission::{OriginPolicy, Refusal};
use backhaul_common::api::CLIENT_PATH_HEADER;
use backhaul_common::bridge::{self, BridgeEnd, Wire};
use backhaul_common::refusal_log::RefusalLog;
use backhaul_common::secret::SecretHash;
use backhaul_common::ws::{switching_protocols, websocket_key, Role, WsReader, WsWriter};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

/// How long a client may take to complete the WebSocket handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for open sessions.
const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// What the backend does with each session.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Connects it to the TCP service at `host:port`.
    Tcp { target: String },
    /// Connects it to the TCP service its path names (`--route PATH=HOST:PORT`).
    Routes(Routes),
    /// POSTs its messages to the application URLs it names (`--http-bridge`).
    HttpBridge(http_bridge::Settings),
}

/// TCP services chosen by the session's path: one backend for several services, each served
/// by the agent as its own backend ID (`--serve ssh=ws://host:9000/ssh`).
///
/// A route takes a session whose path, less what the client added after `/b/<id>` (which the
/// agent names in [`CLIENT_PATH_HEADER`]), is the route's path exactly; other sessions are
/// refused with 404. So a client can add to its path, but cannot add its way into another
/// route, and an agent whose `--serve` URL is not one of the routes reaches none of them.
#[derive(Debug, Clone)]
pub struct Routes(Vec<(String, String)>);

impl Routes {
    /// Checks `PATH=HOST:PORT` entries; the error names the entry and what to write instead.
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        let mut routes: Vec<(String, String)> = Vec::new();
        for entry in entries {
            let Some((path, target)) = entry.split_once('=') else {
                return Err(format!(
                    "--route {entry:?} must be PATH=HOST:PORT, e.g. /ssh=127.0.0.1:22"
                ));
            };
            let path = path.trim().trim_end_matches('/');
            let plain = |c: char| c.is_ascii_alphanumeric() || "-._~!$&'()*+,;:@/".contains(c);
            let dots = path.split('/').any(|seg| seg == "." || seg == "..");
            if !path.starts_with('/') || !path.chars().all(plain) || path.contains("//") || dots {
                return Err(format!(
                    "--route {entry:?}: the path must start with / and name at least one segment of letters, digits and -._~!$&'()*+,;:@ (no spaces, %, ? or #, no . or .. segments)"
                ));
            }
            check_target("--route", target.trim())?;
            if routes.iter().any(|(p, _)| p == path) {
                return Err(format!(
                    "--route {path} is given twice; give each service a path of its own"
                ));
            }
            routes.push((path.to_string(), target.trim().to_string()));
        }
        Ok(Self(routes))
    }

    /// The target for a session whose request path is `path`, of which the client added
    /// `added` at the end (the agent's [`CLIENT_PATH_HEADER`]); else why there is none, for the
    /// log. Without the header nothing is routed: the backend cannot tell what the client added.
    pub fn pick(&self, path: &str, added: Option<&str>) -> Result<&str, String> {
        let shown = |p: &str| admission::loggable(p.as_bytes());
        let Some(added) = added else {
            return Err(format!(
                "no {CLIENT_PATH_HEADER} header came with it (an agent older than --route, or not an agent), so the backend cannot tell the agent's part of the path from its client's: upgrade the agent"
            ));
        };
        let Some(own) = path.strip_suffix(added) else {
            return Err(format!(
                "its {CLIENT_PATH_HEADER} {} is not the end of the path {} (does something between agent and backend rewrite paths?)",
                shown(added),
                shown(path)
            ));
        };
        let own = own.trim_end_matches('/');
        self.0
            .iter()
            .find(|(p, _)| p == own)
            .map(|(_, t)| t.as_str())
            .ok_or_else(|| {
                format!(
                    "the agent dialed path {}, which is no --route's path; its --serve URL must end in exactly one of them ({})",
                    shown(if own.is_empty() { "/" } else { own }),
                    self.paths()
                )
            })
    }

    fn paths(&self) -> String {
        let paths: Vec<&str> = self.0.iter().map(|(p, _)| p.as_str()).collect();
        paths.join(", ")
    }

    /// The routes as `PATH=HOST:PORT`, for the start-up line.
    pub fn describe(&self) -> String {
        let shown: Vec<String> = self.0.iter().map(|(p, t)| format!("{p}={t}")).collect();
        shown.join(", ")
    }
}

/// Fails unless `target` is HOST:PORT.
pub fn check_target(flag: &str, target: &str) -> Result<(), String> {
    match target.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
        _ => Err(format!("{flag} {target:?} must be HOST:PORT")),
    }
}

/// The backend's settings, already validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub mode: Mode,
    /// Serve TLS (`--tls-cert`/`--tls-key`): the agent dials `wss://`, callbacks use `https://`.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub connect_timeout: Duration,
    pub max_sessions: usize,
    /// The hash of `--backend-secret`: handshakes must present the secret in
    /// `X-Backhaul-Secret`. `None`: any handshake is served.
    pub secret: Option<SecretHash>,
    /// The `Origin`s a handshake may carry (`--allow-origin`); one without `Origin` is served.
    pub origins: OriginPolicy,
}

/// What the connections of one backend share.
struct Shared {
    config: Config,
    refusals: Arc<RefusalLog>,
    bridge: Option<Arc<http_bridge::Bridge>>,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

/// Serves WebSocket sessions on `listener` until `shutdown`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let limit = Arc::new(Semaphore::new(config.max_sessions));
    let bridge = match &config.mode {
        Mode::HttpBridge(settings) => Some(http_bridge::Bridge::new(settings.clone())),
        Mode::Tcp { .. } | Mode::Routes(_) => None,
    };
    let shared = Arc::new(Shared {
        tls: config.tls.clone().map(tokio_rustls::TlsAcceptor::from),
        config,
        refusals: RefusalLog::new("refused WebSocket handshakes"),
        bridge,
    });
    let tracker = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => p?,
            _ = shutdown.cancelled() => break,
        };
        let Some((stream, peer)) = backhaul_common::listen::accept(&listener, &shutdown).await
        else {
            break;
        };
        let shared = shared.clone();
        let span = tracing::info_span!("session", client.addr = %peer);
        tracker.spawn(
            async move {
                connection(stream, peer, &shared).await;
                drop(permit);
            }
            .instrument(span),
        );
    }
    tracker.close();
    if tokio::time::timeout(DRAIN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        warn!("sessions still open after {DRAIN_GRACE:?}; exiting anyway");
    }
    Ok(())
}

pub(crate) type Body = http_body_util::Full<bytes::Bytes>;

fn refusal(status: StatusCode, msg: &str) -> Response<Body> {
    let mut resp = Response::new(Body::from(format!("{msg}\n")));
    *resp.status_mut() = status;
    // One refused request per connection: a peer that tries again connects again.
    resp.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    resp
}

/// Logs a refused handshake (at a bounded rate: see [`RefusalLog`]).
fn log_refusal(shared: &Arc<Shared>, peer: SocketAddr, req: &Request<Incoming>, why: &Refusal) {
    shared.refusals.log(|| {
        let forwarded = req
            .headers()
            .get("x-forwarded-for")
            .map(|v| format!(" (for client {})", admission::loggable(v.as_bytes())))
            .unwrap_or_default();
        format!(
            "refused a WebSocket handshake from {peer}{forwarded} with {}: {}",
            why.status(),
            why.explain()
        )
    });
}

/// Serves one accepted connection, over TLS when configured.
async fn connection(stream: TcpStream, peer: SocketAddr, shared: &Arc<Shared>) {
    let Some(acceptor) = &shared.tls else {
        return serve(stream, peer, shared).await;
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => serve(tls, peer, shared).await,
        Ok(Err(e)) => debug!("TLS handshake failed: {e}"),
        Err(_) => debug!("TLS handshake timed out"),
    }
}

/// Serves one connection: a WebSocket handshake (refusing anything else but, in bridge mode,
/// callback POSTs), then the session.
async fn serve<IO>(io: IO, peer: SocketAddr, shared: &Arc<Shared>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let config = &shared.config;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let tx = std::sync::Mutex::new(Some(tx));
    let service = hyper::service::service_fn(|mut req: Request<Incoming>| {
        let admitted = admission::admit(req.headers(), config.secret.as_ref(), &config.origins);
        let bridge = shared.bridge.clone();
        let resp = match (websocket_key(&req), admitted) {
            (None, _) => None,
            (Some(_), Err(why)) => {
                log_refusal(shared, peer, &req, &why);
                Some(refusal(why.status(), why.body()))
            }
            (Some(_), Ok(())) if matches!(destination(config, &req), Dest::Unrouted(_)) => {
                if let Dest::Unrouted(why) = destination(config, &req) {
                    shared.refusals.log(|| {
                        format!("refused a session from {peer}: no --route takes it: {why}")
                    });
                }
                Some(refusal(
                    StatusCode::NOT_FOUND,
                    "backhaul-backend has no --route for this path",
                ))
            }
            (Some(key), Ok(())) => {
                let upgrade = hyper::upgrade::on(&mut req);
                let path = req.uri().to_string();
                let forwarded_for = req
                    .headers()
                    .get("x-forwarded-for")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                if let Some(tx) = tx.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    let dest = destination(config, &req);
                    let _ = tx.send((upgrade, path, forwarded_for, dest));
                }
                Some(switching_protocols(&key, None))
            }
        };
        async move {
            Ok::<_, std::convert::Infallible>(match (resp, bridge) {
                (Some(resp), _) => resp,
                (None, Some(bridge)) => bridge.callback(req).await,
                (None, None) => refusal(
                    StatusCode::UPGRADE_REQUIRED,
                    "backhaul-backend carries WebSocket sessions; it is dialed by backhaul-agent",
                ),
            })
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    // A bridge's callers keep connections open for their next callback: hyper's header timeout
    // bounds how long one may sit idle. Otherwise a connection is one handshake.
    let served = match &shared.bridge {
        Some(_) => Ok(conn.await),
        None => tokio::time::timeout(HANDSHAKE_TIMEOUT, conn).await,
    };
    match served {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            debug!("WebSocket handshake failed: {e}");
            return;
        }
        Err(_) => {
            debug!("WebSocket handshake timed out");
            return;
        }
    }
    let Ok((upgrade, path, forwarded_for, dest)) = rx.await else {
        return; // the connection ended without asking for a WebSocket
    };
    let ws = match upgrade.await {
        Ok(u) => TokioIo::new(u),
        Err(e) => {
            debug!("WebSocket upgrade failed: {e}");
            return;
        }
    };
    match (dest, &shared.bridge) {
        (Dest::Bridge, Some(bridge)) => bridge.session(ws, &path, forwarded_for).await,
        (Dest::Tcp(target), _) => tcp_session(ws, &path, target, config).await,
        // Refused at the handshake.
        (Dest::Unrouted(_) | Dest::Bridge, _) => {}
    }
}

/// Where a session goes, decided once from its request at the handshake.
enum Dest<'a> {
    Tcp(&'a str),
    /// `--route`s are set and none takes the path: why.
    Unrouted(String),
    Bridge,
}

fn destination<'a>(config: &'a Config, req: &Request<Incoming>) -> Dest<'a> {
    match &config.mode {
        Mode::Tcp { target } => Dest::Tcp(target),
        Mode::Routes(routes) => {
            let added = match req.headers().get(CLIENT_PATH_HEADER).map(|v| v.to_str()) {
                None => None,
                Some(Ok(added)) => Some(added),
                Some(Err(_)) => {
                    return Dest::Unrouted(format!("its {CLIENT_PATH_HEADER} is not text"))
                }
            };
            match routes.pick(req.uri().path(), added) {
                Ok(target) => Dest::Tcp(target),
                Err(why) => Dest::Unrouted(why),
            }
        }
        Mode::HttpBridge(_) => Dest::Bridge,
    }
}

/// Carries one session to the TCP service at `target`.
async fn tcp_session(
    ws: TokioIo<hyper::upgrade::Upgraded>,
    path: &str,
    target: &str,
    config: &Config,
) {
    let service =
        match tokio::time::timeout(config.connect_timeout, TcpStream::connect(target)).await {
            Ok(Ok(t)) => t,
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {:?}", config.connect_timeout),
                };
                let reason = format!("backend could not connect to target {target}: {why}");
                warn!(path = %path, "{reason}");
                let (r, w) = tokio::io::split(ws);
                let mut ws_tx = WsWriter::new(w, Role::Server);
                let _ = ws_tx.close(Some((1011, &reason))).await;
                // Wait briefly for the close handshake so the reason reaches the client.
                WsReader::new(r, Role::Server, 0)
                    .drain(bridge::CLOSE_WAIT)
                    .await;
                return;
            }
        };
    let _ = service.set_nodelay(true);
    debug!(path = %path, "connected to target {target}");

    let (r, w) = service.into_split();
    // Google's tcp-bridge frontend asks for its fixed path: answer in its framing.
    let path_only = path.split('?').next().unwrap_or_default();
    let wire = if path_only.ends_with(bridge::GOOGLE_TCPBRIDGE_PATH) {
        Wire::GoogleTcpBridge
    } else {
        Wire::Backhaul
    };
    let summary = bridge::run(r, w, ws, Role::Server, wire).await;
    match &summary.end {
        BridgeEnd::Clean => info!(
            bytes.to_target = summary.from_ws,
            bytes.from_target = summary.to_ws,
            "session ended"
        ),
        end => info!(
            bytes.to_target = summary.from_ws,
            bytes.from_target = summary.to_ws,
            "session ended early: {end}"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(entries: &[&str]) -> Result<Routes, String> {
        Routes::parse(&entries.iter().map(|e| e.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn a_session_takes_the_route_of_the_agents_own_path_only() {
        let r = routes(&[
            "/ssh=127.0.0.1:22",
            "/web/=127.0.0.1:80",
            "/a/b=h:1",
            "/a=h:2",
        ])
        .unwrap();
        let pick = |path: &str, added: Option<&str>| r.pick(path, added).ok();
        assert_eq!(pick("/ssh", Some("")), Some("127.0.0.1:22"));
        assert_eq!(pick("/ssh/", Some("")), Some("127.0.0.1:22"));
        assert_eq!(pick("/web", Some("")), Some("127.0.0.1:80"));
        assert_eq!(pick("/a/b", Some("")), Some("h:1"));
        assert_eq!(pick("/a", Some("")), Some("h:2"));
        // What the client added does not choose the route.
        assert_eq!(pick("/ssh/more", Some("/more")), Some("127.0.0.1:22"));
        assert_eq!(pick("/ssh/", Some("/")), Some("127.0.0.1:22"));
        assert_eq!(pick("/a/b", Some("/b")), Some("h:2"));
        // An agent that dials the backend's root (or a path that is no route): the client's
        // additions reach nothing.
        assert_eq!(pick("/ssh", Some("/ssh")), None);
        assert_eq!(pick("/x/ssh", Some("/ssh")), None);
        for other in ["/", "", "/sshd", "/ssh/more", "/a/bc", "/SSH", "/x/ssh"] {
            assert_eq!(pick(other, Some("")), None, "{other}");
        }
        // Without the agent's word on what was added, nothing is routed.
        let why = r.pick("/ssh", None).unwrap_err();
        assert!(why.contains("upgrade the agent"), "{why}");
        // A header that is not the end of the path is refused, and the log says so.
        let why = r.pick("/ssh", Some("/web")).unwrap_err();
        assert!(why.contains("is not the end of the path"), "{why}");
        let why = r.pick("/nowhere", Some("")).unwrap_err();
        assert!(
            why.contains("path \"/nowhere\", which is no --route's path"),
            "{why}"
        );
        assert_eq!(
            r.describe(),
            "/ssh=127.0.0.1:22, /web=127.0.0.1:80, /a/b=h:1, /a=h:2"
        );
    }

    #[test]
    fn routes_given_twice_or_that_are_not_plain_paths_are_refused() {
        for (entries, says) in [
            (&["/a=h:1", "/a/=h:2"][..], "given twice"),
            (&["/=h:1"][..], "must start with /"),
            (&["ssh=h:1"][..], "must start with /"),
            (&["/a?b=h:1"][..], "no spaces, %, ? or #"),
            (&["/a b=h:1"][..], "no spaces"),
            (&["/a%2Fb=h:1"][..], "no spaces, %"),
            (&["/a//b=h:1"][..], "must start with /"),
            (&["/a/./b=h:1"][..], "no . or .. segments"),
            (&["/a/..=h:1"][..], "no . or .. segments"),
            (&["/a=h"][..], "must be HOST:PORT"),
            (&["/a"][..], "must be PATH=HOST:PORT"),
        ] {
            let e = routes(entries).unwrap_err();
            assert!(e.contains(says), "{entries:?}: {e}");
        }
    }
}
