//! Opening a WebSocket to a `ws://` or `wss://` URL (`http://` and `https://` are read as the
//! same), directly or through an HTTP forward proxy with `CONNECT`, as the environment's
//! `HTTP_PROXY`/`HTTPS_PROXY`/`NO_PROXY` say.

use crate::secret::Secret;
use crate::tls;
use base64::Engine;
use bytes::Bytes;
use http::{header, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use url::Url;

/// Longest proxy response header accepted.
const MAX_PROXY_RESPONSE: usize = 16 * 1024;

/// A TCP stream, with or without TLS.
#[derive(Debug)]
pub enum MaybeTlsStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for MaybeTlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTlsStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTlsStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for MaybeTlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTlsStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTlsStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTlsStream::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTlsStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTlsStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTlsStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// How to dial.
#[derive(Clone)]
pub struct DialOptions {
    /// Limit for the whole dial: TCP, proxy, TLS and WebSocket handshakes.
    pub timeout: Duration,
    /// TLS settings for `wss://`; `None` uses the public web roots.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Subprotocols to offer, in order.
    pub protocols: Vec<String>,
    /// Whether to use the proxy the environment names.
    pub use_env_proxy: bool,
    /// Extra request headers for the handshake (e.g. `Authorization`). The values of
    /// [`SENSITIVE_HEADERS`] are marked sensitive on the wire and never shown by `Debug`.
    pub headers: Vec<(String, String)>,
}

/// Handshake headers whose values are credentials: marked sensitive (so no `Debug` print, ours
/// or a library's trace log, shows them, and HTTP/2 never indexes them) and redacted in
/// [`DialOptions`]' `Debug`.
pub const SENSITIVE_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    crate::api::BACKEND_SECRET_HEADER,
];

fn is_sensitive(name: &str) -> bool {
    SENSITIVE_HEADERS
        .iter()
        .any(|s| s.eq_ignore_ascii_case(name))
}

impl std::fmt::Debug for DialOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|(n, v)| {
                let shown = if is_sensitive(n) { "<redacted>" } else { v };
                (n.as_str(), shown)
            })
            .collect();
        f.debug_struct("DialOptions")
            .field("timeout", &self.timeout)
            .field("tls", &self.tls.is_some())
            .field("protocols", &self.protocols)
            .field("use_env_proxy", &self.use_env_proxy)
            .field("headers", &headers)
            .finish()
    }
}

/// Handshake headers (for [`DialOptions::headers`]) presenting `token` as a bearer token; none
/// without a token.
pub fn bearer_headers(token: Option<&Secret>) -> Vec<(String, String)> {
    token
        .map(|t| {
            vec![(
                "Authorization".to_string(),
                format!("Bearer {}", t.expose()),
            )]
        })
        .unwrap_or_default()
}

impl Default for DialOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            tls: None,
            protocols: Vec::new(),
            use_env_proxy: true,
            headers: Vec::new(),
        }
    }
}

/// Why a dial failed, worded for the log.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("bad URL {0}: {1}")]
    BadUrl(String, String),
    #[error("could not connect to {0}: {1}")]
    Connect(String, io::Error),
    #[error("proxy {proxy} refused to tunnel to {target}: {status}")]
    ProxyRefused {
        proxy: String,
        target: String,
        status: String,
    },
    #[error("TLS with {0} failed: {1}")]
    Tls(String, io::Error),
    #[error("{url} answered HTTP {status} instead of accepting the WebSocket: {body}")]
    Http {
        url: String,
        status: u16,
        body: String,
    },
    #[error("WebSocket handshake with {0} failed: {1}")]
    Handshake(String, String),
    #[error("no answer from {0} within {1:?}")]
    Timeout(String, Duration),
}

/// The connection under a WebSocket once the handshake is done (any bytes the server sent
/// right after its answer are still in it).
pub type WsIo = TokioIo<hyper::upgrade::Upgraded>;

/// The result of a successful dial.
pub struct Dialed {
    pub io: WsIo,
    /// The subprotocol the server chose, if any.
    pub protocol: Option<String>,
}

/// Largest error body read from a server that refused the upgrade.
const MAX_REFUSAL_BODY: usize = 4 * 1024;

/// Opens a WebSocket to `url`.
pub async fn dial(url: &Url, opts: &DialOptions) -> Result<Dialed, DialError> {
    tokio::time::timeout(opts.timeout, dial_inner(url, opts))
        .await
        .map_err(|_| DialError::Timeout(url.to_string(), opts.timeout))?
}

async fn dial_inner(url: &Url, opts: &DialOptions) -> Result<Dialed, DialError> {
    let bad = |m: &str| DialError::BadUrl(url.to_string(), m.to_string());
    let secure = match url.scheme() {
        "ws" | "http" => false,
        "wss" | "https" => true,
        other => {
            return Err(bad(&format!(
                "scheme {other}: is not ws, wss, http or https"
            )))
        }
    };
    let host = url.host_str().ok_or_else(|| bad("no host"))?.to_string();
    let port = url.port_or_known_default().ok_or_else(|| bad("no port"))?;
    let mut ws_url = url.clone();
    let _ = ws_url.set_scheme(if secure { "wss" } else { "ws" });

    let proxy = if opts.use_env_proxy {
        proxy_for(secure, &host)
    } else {
        None
    };
    let bare_host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let tcp = match &proxy {
        None => connect_tcp(&bare_host, port).await?,
        Some(proxy) => connect_via_proxy(proxy, &host, port).await?,
    };
    let stream = if secure {
        let config = match &opts.tls {
            Some(c) => c.clone(),
            None => tls::client_config(None)
                .map_err(|e| DialError::Tls(host.clone(), io::Error::other(e.to_string())))?,
        };
        let name = rustls::pki_types::ServerName::try_from(bare_host.clone())
            .map_err(|_| bad("host is not a valid TLS server name"))?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| DialError::Tls(host.clone(), e))?;
        MaybeTlsStream::Tls(Box::new(tls))
    } else {
        MaybeTlsStream::Plain(tcp)
    };

    let authority = match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.clone(),
    };
    let target = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_string(),
    };
    let key = generate_key();
    let request = handshake_request(&target, &authority, &key, opts).map_err(|m| bad(&m))?;

    let handshake_failed =
        |e: &dyn std::fmt::Display| DialError::Handshake(ws_url.to_string(), e.to_string());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| handshake_failed(&e))?;
    // The connection task ends once the upgrade hands the socket over, or with the dial.
    tokio::spawn(conn.with_upgrades());
    let resp = sender
        .send_request(request)
        .await
        .map_err(|e| handshake_failed(&e))?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), MAX_REFUSAL_BODY)
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_string())
            .unwrap_or_default();
        return Err(DialError::Http {
            url: ws_url.to_string(),
            status,
            body,
        });
    }
    let accept = resp
        .headers()
        .get(header::SEC_WEBSOCKET_ACCEPT)
        .map(|v| v.as_bytes().to_vec());
    if accept.as_deref() != Some(derive_accept_key(key.as_bytes()).as_bytes()) {
        return Err(handshake_failed(
            &"the server's Sec-WebSocket-Accept does not match our key",
        ));
    }
    let protocol = resp
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if protocol
        .as_ref()
        .is_some_and(|p| !opts.protocols.iter().any(|o| o == p))
    {
        return Err(handshake_failed(
            &"the server chose a subprotocol we did not offer",
        ));
    }
    let upgraded = hyper::upgrade::on(resp)
        .await
        .map_err(|e| handshake_failed(&e))?;
    Ok(Dialed {
        io: TokioIo::new(upgraded),
        protocol,
    })
}

/// The WebSocket handshake request: `GET target` with our key, the subprotocols and the extra
/// headers of `opts`, credentials among them marked sensitive. `Err` names what is not valid
/// header text (never a header's value).
fn handshake_request(
    target: &str,
    authority: &str,
    key: &str,
    opts: &DialOptions,
) -> Result<Request<Empty<Bytes>>, String> {
    let mut request = Request::get(target)
        .header(header::HOST, authority)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header(header::SEC_WEBSOCKET_KEY, key)
        .header(header::SEC_WEBSOCKET_VERSION, "13");
    if !opts.protocols.is_empty() {
        let v = HeaderValue::from_str(&opts.protocols.join(", "))
            .map_err(|_| "subprotocol names are not valid header text".to_string())?;
        request = request.header(header::SEC_WEBSOCKET_PROTOCOL, v);
    }
    for (name, value) in &opts.headers {
        let mut v = HeaderValue::from_str(value)
            .map_err(|_| format!("header {name} is not valid header text"))?;
        if is_sensitive(name) {
            v.set_sensitive(true);
        }
        let n = http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("{name:?} is not a header name"))?;
        request = request.header(n, v);
    }
    request
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())
}

async fn connect_tcp(host: &str, port: u16) -> Result<TcpStream, DialError> {
    let tcp = TcpStream::connect((host, port))
        .await
        .map_err(|e| DialError::Connect(format!("{host}:{port}"), e))?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// Opens a tunnel to `host:port` through the HTTP proxy at `proxy` with `CONNECT`.
async fn connect_via_proxy(proxy: &Url, host: &str, port: u16) -> Result<TcpStream, DialError> {
    let proxy_host = proxy
        .host_str()
        .ok_or_else(|| DialError::BadUrl(proxy.to_string(), "proxy URL has no host".into()))?;
    let proxy_host = proxy_host.trim_start_matches('[').trim_end_matches(']');
    let proxy_port = proxy.port_or_known_default().unwrap_or(3128);
    let mut tcp = connect_tcp(proxy_host, proxy_port).await?;
    let target = format!("{host}:{port}");
    let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if !proxy.username().is_empty() {
        let user = percent_decode(proxy.username());
        let pass = percent_decode(proxy.password().unwrap_or(""));
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        req.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
    }
    req.push_str("\r\n");
    let proxy_name = format!("{proxy_host}:{proxy_port}");
    tcp.write_all(req.as_bytes())
        .await
        .map_err(|e| DialError::Connect(proxy_name.clone(), e))?;

    // Read the response header byte-wise through a small buffer, never past its end, so no
    // tunnelled bytes are swallowed.
    let mut reader = BufReader::with_capacity(1, &mut tcp);
    let mut status_line = String::new();
    let mut total = 0;
    loop {
        let mut line = String::new();
        let n = reader
            .read_line(&mut line)
            .await
            .map_err(|e| DialError::Connect(proxy_name.clone(), e))?;
        total += n;
        if n == 0 || total > MAX_PROXY_RESPONSE {
            return Err(DialError::ProxyRefused {
                proxy: proxy_name,
                target,
                status: "connection closed or oversized answer".into(),
            });
        }
        if status_line.is_empty() {
            status_line = line.trim().to_string();
        } else if line == "\r\n" || line == "\n" {
            break;
        }
    }
    let ok = status_line
        .split_whitespace()
        .nth(1)
        .is_some_and(|code| code.starts_with('2'));
    if !ok {
        return Err(DialError::ProxyRefused {
            proxy: proxy_name,
            target,
            status: status_line,
        });
    }
    Ok(tcp)
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

fn env_any(names: &[&str]) -> Option<String> {
    names
        .iter()
        .find_map(|n| std::env::var(n).ok())
        .filter(|v| !v.trim().is_empty())
}

/// The proxy the environment names for a connection to `host`, if any.
pub fn proxy_for(secure: bool, host: &str) -> Option<Url> {
    let proxy = if secure {
        env_any(&["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"])
    } else {
        env_any(&["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"])
    }?;
    let no_proxy = env_any(&["NO_PROXY", "no_proxy"]).unwrap_or_default();
    if no_proxy_matches(&no_proxy, host) {
        return None;
    }
    let proxy = if proxy.contains("://") {
        proxy
    } else {
        format!("http://{proxy}")
    };
    Url::parse(&proxy).ok()
}

/// Whether `host` is excluded by a `NO_PROXY` list: `*`, exact names, and domain suffixes
/// (`example.com` and `.example.com` both cover `a.example.com`).
pub fn no_proxy_matches(no_proxy: &str, host: &str) -> bool {
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    no_proxy
        .split(',')
        .map(|e| e.trim().to_ascii_lowercase())
        .filter(|e| !e.is_empty())
        .any(|entry| {
            if entry == "*" {
                return true;
            }
            // Drop a port, if given, for matching.
            let entry = match entry.rsplit_once(':') {
                Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) && !h.contains(':') => {
                    h.to_string()
                }
                _ => entry,
            };
            let suffix = entry.trim_start_matches('.');
            host == suffix || host.ends_with(&format!(".{suffix}"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_proxy_rules() {
        assert!(no_proxy_matches("*", "anything"));
        assert!(no_proxy_matches("localhost,127.0.0.1", "127.0.0.1"));
        assert!(no_proxy_matches("example.com", "a.example.com"));
        assert!(no_proxy_matches(".example.com", "example.com"));
        assert!(no_proxy_matches(" Example.COM:443 ", "x.example.com"));
        assert!(!no_proxy_matches("example.com", "badexample.com"));
        assert!(!no_proxy_matches("", "example.com"));
        assert!(no_proxy_matches("::1", "[::1]"));
    }

    #[test]
    fn credentials_in_handshakes_are_sensitive_and_never_printed() {
        let token = Secret::generate();
        let mut opts = DialOptions {
            headers: bearer_headers(Some(&token)),
            ..DialOptions::default()
        };
        opts.headers
            .push(("X-Backhaul-Secret".into(), "backend-s3cret".into()));
        opts.headers.push(("User-Agent".into(), "test/1".into()));
        let req = handshake_request("/p", "h:1", "k", &opts).unwrap();
        let auth = req.headers().get(header::AUTHORIZATION).unwrap();
        assert!(auth.is_sensitive());
        assert_eq!(auth.to_str().unwrap(), format!("Bearer {}", token.expose()));
        assert!(req
            .headers()
            .get("x-backhaul-secret")
            .unwrap()
            .is_sensitive());
        assert!(!req
            .headers()
            .get(header::USER_AGENT)
            .unwrap()
            .is_sensitive());
        for printed in [format!("{req:?}"), format!("{opts:?}")] {
            assert!(!printed.contains(token.expose()), "{printed}");
            assert!(!printed.contains("backend-s3cret"), "{printed}");
        }
        assert!(format!("{opts:?}").contains("test/1"));
        // A value that is not header text is refused without being repeated.
        opts.headers = vec![("Authorization".into(), "Bearer tok\nen".into())];
        let err = handshake_request("/p", "h:1", "k", &opts).unwrap_err();
        assert!(
            err.contains("Authorization") && !err.contains("tok"),
            "{err}"
        );
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%40b"), "a@b");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }

    #[tokio::test]
    async fn connect_through_a_proxy_and_refusal() {
        use tokio::io::AsyncReadExt;
        use tokio::net::TcpListener;
        // A target that says hello, and a minimal CONNECT proxy in front of it.
        let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target_addr = target.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = target.accept().await.unwrap();
            s.write_all(b"hello").await.unwrap();
        });
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_addr = proxy.local_addr().unwrap();
        tokio::spawn(async move {
            for allow in [true, false] {
                let (mut s, _) = proxy.accept().await.unwrap();
                let mut buf = vec![0u8; 1024];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut buf).await.unwrap();
                    got.extend_from_slice(&buf[..n]);
                }
                let req = String::from_utf8_lossy(&got).to_string();
                assert!(req.starts_with(&format!("CONNECT {target_addr} HTTP/1.1")));
                assert!(req.contains("Proxy-Authorization: Basic dTpwQHNz"));
                if !allow {
                    s.write_all(b"HTTP/1.1 403 Forbidden\r\n\r\n")
                        .await
                        .unwrap();
                    continue;
                }
                s.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await
                    .unwrap();
                let mut up = TcpStream::connect(target_addr).await.unwrap();
                tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut s, &mut up).await;
                });
            }
        });
        let proxy_url = Url::parse(&format!("http://u:p%40ss@{proxy_addr}")).unwrap();
        let host = target_addr.ip().to_string();
        let mut s = connect_via_proxy(&proxy_url, &host, target_addr.port())
            .await
            .unwrap();
        let mut hello = [0u8; 5];
        s.read_exact(&mut hello).await.unwrap();
        assert_eq!(&hello, b"hello");
        let err = connect_via_proxy(&proxy_url, &host, target_addr.port())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("403"), "{err}");
    }
}
