//! What the agent counts, served with `--metrics-listen ADDR` at `/metrics` (OpenMetrics text,
//! written by prometheus-client). One set per process, whatever number of backends it serves;
//! the `backend` label takes only the backend IDs of its own configuration.

use crate::transport::Transport;
use backhaul_common::metrics::{encode, exchanges, registered, Exchanges};
pub use backhaul_common::metrics::{BackendLabel, BytesLabels, KindLabel, LinkLabels};
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Scrapes served at once; more wait to be accepted.
const MAX_SCRAPERS: usize = 16;
/// How long a scraper may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChangeLabels {
    pub backend: String,
    pub from: &'static str,
    pub to: &'static str,
}

/// The agent's counters.
pub struct AgentMetrics {
    registry: Registry,
    pub links: Family<LinkLabels, Gauge>,
    pub sessions_open: Family<BackendLabel, Gauge>,
    pub sessions_opened: Family<BackendLabel, Counter>,
    pub session_bytes: Family<BytesLabels, Counter>,
    pub transport_changes: Family<ChangeLabels, Counter>,
    pub registration_failures: Family<KindLabel, Counter>,
    pub exchange_seconds: Exchanges,
    pub frames_resent: Counter,
    pub window_stalls: Counter,
}

/// The process's counters.
pub fn metrics() -> &'static AgentMetrics {
    static METRICS: OnceLock<AgentMetrics> = OnceLock::new();
    METRICS.get_or_init(AgentMetrics::new)
}

impl AgentMetrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("backhaul_agent");
        let r = &mut registry;
        Self {
            links: registered(r, "links", "Links to the relay up now, by backend and the transport carrying them", Default::default()),
            sessions_open: registered(r, "sessions_open", "Sessions carried now", Default::default()),
            sessions_opened: registered(r, "sessions_opened", "Sessions the relay handed to this agent", Default::default()),
            session_bytes: registered(r, "session_bytes", "Payload bytes of ended sessions, by direction", Default::default()),
            transport_changes: registered(r, "transport_changes", "Links that moved from one transport to another (fallbacks, and back to faster ones)", Default::default()),
            registration_failures: registered(r, "registration_failures", "Registrations that failed: lasting (fix the settings) or transient (retried soon)", Default::default()),
            exchange_seconds: registered(r, "longpoll_exchange_seconds", "How long long-poll requests took (polls include the relay's hold)", exchanges()),
            frames_resent: registered(r, "frames_resent", "Frames sent to the relay again, after a lost push or a broken stream", Default::default()),
            window_stalls: registered(r, "window_stalls", "Frames from the relay whose sender said it was held back by the session's window", Default::default()),
            registry,

        }
    }

    /// Notes that `backend`'s link is now carried over `to` (and no longer over `from`).
    pub fn transport(&self, backend: &str, from: Option<Transport>, to: Transport) {
        if let Some(from) = from {
            self.link(backend, from).set(0);
            self.transport_changes
                .get_or_create(&ChangeLabels {
                    backend: backend.to_string(),
                    from: from.label(),
                    to: to.label(),
                })
                .inc();
        }
        self.link(backend, to).set(1);
    }

    /// Notes that `backend`'s link ended (it registers again, or stops).
    pub fn link_ended(&self, backend: &str, transport: Option<Transport>) {
        if let Some(t) = transport {
            self.link(backend, t).set(0);
        }
    }

    fn link(&self, backend: &str, transport: Transport) -> Gauge {
        self.links
            .get_or_create(&LinkLabels {
                backend: backend.to_string(),
                transport: transport.label().to_string(),
            })
            .clone()
    }

    /// Counts a session of `backend` as open until the returned guard drops.
    pub fn session(&self, backend: &str) -> SessionCount {
        let label = BackendLabel {
            backend: backend.to_string(),
        };
        self.sessions_opened.get_or_create(&label).inc();
        let open = self.sessions_open.get_or_create(&label).clone();
        open.inc();
        SessionCount(open)
    }

    /// Counts an ended session's bytes.
    pub fn session_ended(&self, backend: &str, to_backend: u64, from_backend: u64) {
        for (direction, n) in [("to_backend", to_backend), ("from_backend", from_backend)] {
            self.session_bytes
                .get_or_create(&BytesLabels {
                    backend: backend.to_string(),
                    direction,
                })
                .inc_by(n);
        }
    }

    pub fn encode(&self) -> String {
        encode(&self.registry)
    }
}

/// Keeps a session counted as open.
pub struct SessionCount(Gauge);

impl Drop for SessionCount {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, shutdown: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPERS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some((stream, _)) = backhaul_common::listen::accept(&listener, &shutdown).await else {
            return;
        };
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                let mut resp = Response::new(Full::new(bytes::Bytes::new()));
                if req.method() == http::Method::GET && req.uri().path() == "/metrics" {
                    *resp.body_mut() = Full::new(bytes::Bytes::from(metrics().encode()));
                    resp.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static(backhaul_common::metrics::CONTENT_TYPE),
                    );
                } else {
                    *resp.status_mut() = StatusCode::NOT_FOUND;
                    *resp.body_mut() = Full::new(bytes::Bytes::from_static(
                        b"the agent serves only GET /metrics here\n",
                    ));
                }
                Ok::<_, std::convert::Infallible>(resp)
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(REQUEST_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(REQUEST_TIMEOUT * 3, conn).await;
            drop(permit);
        });
    }
}
