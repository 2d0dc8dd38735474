//! Dialing the backend's WebSocket for one session.

use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::WebSocketStream;

/// Opens the backend WebSocket at `url`, offering the client's subprotocols. Returns the stream
/// and the subprotocol the backend chose.
pub async fn dial(
    url: &str,
    protocols: &[String],
    timeout: Duration,
) -> anyhow::Result<(WebSocketStream<TcpStream>, Option<String>)> {
    let parsed = url::Url::parse(url).map_err(|e| anyhow::anyhow!("bad backend URL {url}: {e}"))?;
    let host = parsed
        .host_str()
        .ok_or_else(|| anyhow::anyhow!("backend URL {url} has no host"))?
        .to_string();
    let port = parsed.port_or_known_default().unwrap_or(80);
    let mut request = url.into_client_request()?;
    if !protocols.is_empty() {
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_str(&protocols.join(", "))?,
        );
    }
    let fut = async {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let tcp = TcpStream::connect((host, port)).await?;
        let _ = tcp.set_nodelay(true);
        let (ws, resp) = tokio_tungstenite::client_async_with_config(
            request,
            tcp,
            Some(backhaul_common::ws_config()),
        )
        .await?;
        let protocol = resp
            .headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        anyhow::Ok((ws, protocol))
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {timeout:?}"))?
}
