//! backhaul-agent: runs inside the private network and only ever connects out to the relay. It
//! uses the fastest transport the path allows (a WebSocket, else an HTTP/2 stream, else ordinary
//! HTTP/1.1 long-poll GET and POST requests that pass the strictest forward proxies); for each
//! session the relay hands it, it dials the backend's WebSocket.
//!
//! - [`transport`]: the transports, and the ladder `--transport auto` moves along (IO-free);
//! - [`link`]: one registration with the relay: runs the ladder, hands the relay's frames to
//!   its sessions (each session dials the backend's WebSocket with `common::dial`);
//! - [`stream`]: the link over a WebSocket or an HTTP/2 stream;
//! - [`longpoll`]: the link over polls and pushes; when they go is decided by its IO-free
//!   [`longpoll::PollPlan`] and [`longpoll::PushPlan`];
//! - [`body`]: the relay's answers, read up to a stated limit and no further.
#![forbid(unsafe_code)]

pub mod body;
pub mod link;
pub mod longpoll;
pub mod metrics;
pub mod refused;
pub mod stream;
pub mod transport;

use anyhow::Context;
use backhaul_common::api::{Hello, LinkInfo, LINKS_PATH, PROTOCOL_VERSION};
use backhaul_common::backoff::Backoff;
use backhaul_common::secret::{self, Secret};
use backhaul_common::transport::{H2_CONNECTION_WINDOW, H2_MAX_FRAME, H2_STREAM_WINDOW};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Longest a registration request may take.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(15);
/// TCP connect timeout towards the relay (or the proxy in front of it).
const RELAY_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The agent's settings, already validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// The relay's base URL (`http://` or `https://`), without a trailing slash.
    pub relay: url::Url,
    pub backend_id: String,
    /// The backend's WebSocket URL; a session's path is appended to its path (see
    /// `api::backend_url`).
    pub backend: url::Url,
    /// Largest WebSocket message the backend may send; a larger one is refused with 1009.
    pub max_message: u64,
    /// The relay's `--agent-token`.
    pub agent_token: Option<Secret>,
    /// The backend's `--backend-secret`, presented in
    /// [`backhaul_common::api::BACKEND_SECRET_HEADER`] when dialing it.
    pub backend_secret: Option<Secret>,
    /// Whether a session's close reason may say why the backend could not be reached (its
    /// address and the error); otherwise it says only [`link::BACKEND_UNAVAILABLE`].
    pub report_backend_errors: bool,
    /// TLS settings for an https:// relay and a wss:// backend.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub max_sessions: usize,
    /// Bytes of window growth all sessions together may be granted (see
    /// `backhaul_common::window`); how far one session's window grows is the relay's word.
    pub window_budget: Arc<backhaul_common::window::Budget>,
    pub connect_timeout: Duration,
    /// Which transport(s) to use towards the relay.
    pub transport: transport::TransportChoice,
    /// Ask the relay to expose the backend on a TCP port.
    pub expose: Option<backhaul_common::api::ExposeRequest>,
}

/// One backend the agent serves: its ID at the relay, and what its sessions reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub id: String,
    pub url: url::Url,
}

/// Reads the services again (on SIGHUP); the error says why the old ones stay.
pub type Reload = Box<dyn Fn() -> Result<Vec<Service>, String> + Send + Sync>;

impl Config {
    /// This configuration, serving `service`.
    pub fn serving(&self, service: &Service) -> Config {
        Config {
            backend_id: service.id.clone(),
            backend: service.url.clone(),
            ..self.clone()
        }
    }

    /// The relay URL as a string without a trailing slash.
    pub fn relay_base(&self) -> String {
        self.relay.as_str().trim_end_matches('/').to_string()
    }
}

/// The HTTP clients for the relay, both honouring HTTP(S)_PROXY and NO_PROXY.
#[derive(Clone)]
pub struct Clients {
    /// HTTP/1.1: registration, long-poll.
    pub h1: reqwest::Client,
    /// HTTP/1.1 without keeping connections: for paths that close them after every answer.
    pub h1_fresh: reqwest::Client,
    /// HTTP/2 only (ALPN `h2`, or prior knowledge for `http://`): the http2 transport.
    pub h2: reqwest::Client,
}

/// Builds the relay clients.
pub fn http_clients(cfg: &Config) -> anyhow::Result<Clients> {
    let tls = match &cfg.tls {
        Some(t) => (**t).clone(),
        None => backhaul_common::tls::client_config(None)
            .context("could not set up TLS for the relay connection")?
            .as_ref()
            .clone(),
    };
    let base = || {
        reqwest::Client::builder()
            .connect_timeout(RELAY_CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(30))
            .user_agent(concat!("backhaul-agent/", env!("CARGO_PKG_VERSION")))
    };
    let mut tls1 = tls.clone();
    tls1.alpn_protocols = vec![b"http/1.1".to_vec()];
    let h1 = base()
        .http1_only()
        .tls_backend_preconfigured(tls1.clone())
        .build()
        .context("could not build the HTTP/1.1 client")?;
    let h1_fresh = base()
        .http1_only()
        .pool_max_idle_per_host(0)
        .tls_backend_preconfigured(tls1)
        .build()
        .context("could not build the HTTP/1.1 client")?;
    let mut tls2 = tls;
    tls2.alpn_protocols = vec![b"h2".to_vec()];
    // Each http2 stream is one long request: keep no idle connection for the next one, which
    // would otherwise reuse a connection that a proxy cut with the last stream and hang on it.
    let h2 = base()
        .pool_max_idle_per_host(0)
        .http2_prior_knowledge()
        .http2_initial_stream_window_size(Some(H2_STREAM_WINDOW))
        .http2_initial_connection_window_size(Some(H2_CONNECTION_WINDOW))
        .http2_max_frame_size(Some(H2_MAX_FRAME))
        .tls_backend_preconfigured(tls2)
        .build()
        .context("could not build the HTTP/2 client")?;
    Ok(Clients { h1, h1_fresh, h2 })
}

/// Serves every one of `services` over a link of its own (each as [`run`] does) until
/// `shutdown`. With `reload`, SIGHUP reads the services again: new ones start, removed ones
/// stop (their sessions close), changed ones restart, and the rest go on untouched.
pub async fn serve_all(
    base: Config,
    services: Vec<Service>,
    shutdown: CancellationToken,
    reload: Option<Reload>,
) -> anyhow::Result<()> {
    use tracing::Instrument;
    let mut running: std::collections::HashMap<
        String,
        (Service, CancellationToken, tokio::task::JoinHandle<()>),
    > = std::collections::HashMap::new();
    let start = |s: &Service| {
        let stop = shutdown.child_token();
        let cfg = base.serving(s);
        let span = tracing::info_span!("backend", backend.id = %s.id);
        let token = stop.clone();
        let task = tokio::spawn(
            async move {
                if let Err(e) = run(cfg, token).await {
                    error!("{e:#}");
                }
            }
            .instrument(span),
        );
        (s.clone(), stop, task)
    };
    for s in &services {
        running.insert(s.id.clone(), start(s));
    }
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let hup = async {
            match hangup.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hup = std::future::pending::<Option<()>>();
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = hup => {}
        }
        let Some(reload) = &reload else {
            info!("SIGHUP: nothing to reload (the backends come from --serve or --backend-id; a --config file's serve list is what a reload reads)");
            continue;
        };
        let wanted = match reload() {
            Ok(w) if w.is_empty() => {
                warn!("reload: the settings now list no backend; keeping the ones served");
                continue;
            }
            Ok(w) if w.len() > 1 && base.expose.is_some() => {
                warn!("reload: --expose exposes one backend, and the settings now list {}; keeping the backends served", w.len());
                continue;
            }
            Ok(w) => w,
            Err(e) => {
                warn!("reload failed, keeping the backends served: {e}");
                continue;
            }
        };
        // Gone or changed, and any that ended by itself: stopped together, started again below.
        let gone: Vec<String> = running
            .iter()
            .filter(|(id, (s, _, task))| {
                task.is_finished() || !wanted.iter().any(|w| w == s && &w.id == *id)
            })
            .map(|(id, _)| id.clone())
            .collect();
        let mut stopping = Vec::new();
        for id in gone {
            if let Some((s, stop, task)) = running.remove(&id) {
                if !wanted.iter().any(|w| w.id == s.id) {
                    info!("reload: no longer serving backend {} ({})", s.id, s.url);
                }
                stop.cancel();
                stopping.push(task);
            }
        }
        for task in stopping {
            let _ = task.await;
        }
        for w in &wanted {
            if !running.contains_key(&w.id) {
                info!("reload: now serving backend {} ({})", w.id, w.url);
                running.insert(w.id.clone(), start(w));
            }
        }
        let mut ids: Vec<&str> = running.keys().map(String::as_str).collect();
        ids.sort_unstable();
        info!("reload done: serving {}", ids.join(", "));
    }
    for (_, (_, _, task)) in running {
        let _ = task.await;
    }
    Ok(())
}

/// Registers with the relay and serves sessions until `shutdown`, re-registering whenever the
/// link is lost.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let cfg = Arc::new(config);
    let clients = http_clients(&cfg)?;
    let mut backoff = Backoff::default();
    let mut lasting = Backoff::new(refused::LASTING_INITIAL, refused::LASTING_MAX);
    let hello = hello(&cfg);
    while !shutdown.is_cancelled() {
        let registered = tokio::select! {
            r = register(&cfg, &clients.h1, &hello) => r,
            _ = shutdown.cancelled() => break,
        };
        match registered {
            Ok(info) => {
                backoff.reset();
                lasting.reset();
                backhaul_common::telemetry::announce(&format!(
                    "backhaul-agent: connected to relay {} as link {} for backend {}",
                    cfg.relay_base(),
                    info.link,
                    cfg.backend_id
                ));
                info!(link.id = %info.link, "registered with relay {}", cfg.relay_base());
                if cfg.expose.is_some() && info.exposed.is_none() {
                    warn!("asked relay {} to expose backend {} but it answered without a port: the relay is older than this agent; upgrade it", cfg.relay_base(), cfg.backend_id);
                }
                if let Some(e) = &info.exposed {
                    let host = cfg.relay.host_str().unwrap_or("the relay");
                    backhaul_common::telemetry::announce(&format!(
                        "backhaul-agent: exposed backend {} at {host}:{} (tunnel {})",
                        cfg.backend_id, e.port, e.tunnel
                    ));
                    info!(
                        "exposed backend {} at {host}:{} (tunnel {})",
                        cfg.backend_id, e.port, e.tunnel
                    );
                }
                let link = link::Link::new(cfg.clone(), &clients, info, &shutdown);
                let why = link.clone().run().await;
                metrics::metrics().link_ended(&cfg.backend_id, link.carrier());
                if shutdown.is_cancelled() {
                    link.deregister().await;
                    break;
                }
                warn!("link to relay ended: {why}; registering again");
            }
            Err(failure) => {
                metrics::metrics()
                    .registration_failures
                    .get_or_create(&metrics::KindLabel {
                        kind: if failure.lasting {
                            "lasting"
                        } else {
                            "transient"
                        },
                    })
                    .inc();
                // An answer that will not change by itself (a wrong token, not a relay) is
                // retried every few minutes, not every few seconds.
                let d = if failure.lasting {
                    backoff.reset();
                    lasting.next_delay()
                } else {
                    lasting.reset();
                    backoff.next_delay()
                };
                let secs = d.as_secs_f32().max(0.1);
                if failure.lasting {
                    error!(
                        "could not register: {}; trying again in {secs:.0} s",
                        failure.message
                    );
                } else {
                    warn!(
                        "could not register: {}; trying again in {secs:.1} s",
                        failure.message
                    );
                }
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = shutdown.cancelled() => break,
                }
            }
        }
    }
    info!("agent stopped");
    Ok(())
}

/// What the agent says about itself when it registers.
fn hello(cfg: &Config) -> Hello {
    let host = std::env::var("HOSTNAME").unwrap_or_default();
    Hello {
        protocol: PROTOCOL_VERSION,
        backend_id: cfg.backend_id.clone(),
        agent: format!("backhaul-agent/{} {host}", backhaul_common::VERSION)
            .trim()
            .to_string(),
        expose: cfg.expose.clone(),
    }
}

/// `--check`: registers once (then deregisters) and connects to the backend's host and port
/// once. `Ok` says what worked; `Err` says what did not, and what to do.
pub async fn check(config: Config) -> Result<String, String> {
    let clients = http_clients(&config).map_err(|e| format!("{e:#}"))?;
    let info = register(&config, &clients.h1, &hello(&config))
        .await
        .map_err(|f| f.message)?;
    let link_url = format!("{}{LINKS_PATH}/{}", config.relay_base(), info.link);
    let mut bye = clients.h1.delete(&link_url).timeout(Duration::from_secs(2));
    if let Some(t) = &config.agent_token {
        bye = bye.header(reqwest::header::AUTHORIZATION, secret::bearer(t));
    }
    let _ = bye.send().await;
    let backend = &config.backend;
    let host = backend.host_str().unwrap_or_default();
    let port = backend.port_or_known_default().unwrap_or(0);
    match tokio::time::timeout(
        config.connect_timeout,
        tokio::net::TcpStream::connect((host, port)),
    )
    .await
    {
        Ok(Ok(_)) => Ok(format!(
            "registered with relay {} for backend {}, and the backend {backend} accepts connections",
            config.relay_base(),
            config.backend_id
        )),
        Ok(Err(e)) => Err(format!(
            "registered with relay {}, but the backend {backend} refuses connections: {e}",
            config.relay_base()
        )),
        Err(_) => Err(format!(
            "registered with relay {}, but the backend {backend} did not answer within {:?}",
            config.relay_base(),
            config.connect_timeout
        )),
    }
}

/// Registers once: the link's parameters, or why not (see [`refused`]).
pub async fn register(
    cfg: &Config,
    client: &reqwest::Client,
    hello: &Hello,
) -> Result<LinkInfo, refused::Failure> {
    let url = format!("{}{LINKS_PATH}", cfg.relay_base());
    let body = serde_json::to_vec(hello).map_err(|e| {
        refused::Failure::lasting(format!("could not encode the registration: {e}"))
    })?;
    let mut req = client
        .post(&url)
        .timeout(REGISTER_TIMEOUT)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body);
    if let Some(t) = &cfg.agent_token {
        req = req.header(reqwest::header::AUTHORIZATION, secret::bearer(t));
    }
    let resp = req
        .send()
        .await
        .map_err(|e| refused::no_answer(&url, &link::describe(&e)))?;
    let status = resp.status();
    if !status.is_success() {
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let text = body::error_text(resp).await;
        return Err(refused::answer(&url, status.as_u16(), &content_type, &text));
    }
    let not_a_relay = |why: String| {
        refused::Failure::lasting(format!("{url} answered the registration with {why}: is it really a backhaul relay? check --relay"))
    };
    let body = body::read_limited(resp, body::MAX_JSON_BODY, "registration")
        .await
        .map_err(|e| refused::Failure::transient(e.to_string()))?;
    let info: LinkInfo = serde_json::from_slice(&body)
        .map_err(|e| not_a_relay(format!("something that is not a backhaul answer ({e})")))?;
    if info.window < 1024 || info.max_batch_bytes < 1024 || info.poll_hold_ms == 0 {
        return Err(not_a_relay(format!("unusable link parameters {info:?}")));
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(backend: &str) -> Config {
        Config {
            relay: url::Url::parse("http://r:1/").unwrap(),
            backend_id: "x".into(),
            backend: url::Url::parse(backend).unwrap(),
            max_message: 1 << 20,
            agent_token: None,
            backend_secret: None,
            report_backend_errors: false,
            tls: None,
            max_sessions: 1,
            window_budget: backhaul_common::window::Budget::new(0),
            connect_timeout: Duration::from_secs(1),
            transport: transport::TransportChoice::Auto,
            expose: None,
        }
    }

    #[test]
    fn relay_base_has_no_trailing_slash() {
        assert_eq!(cfg("ws://b:9").relay_base(), "http://r:1");
    }
}
