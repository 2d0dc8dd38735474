//! Reading what the programs count: their `/metrics` pages, parsed with a real Prometheus
//! text-format parser.

use crate::bridge_app::http;
use crate::Program;
use std::collections::HashMap;
use std::net::SocketAddr;

/// The samples of a scrape: `name{labels}` (labels sorted) to value.
pub fn scrape(text: &str) -> HashMap<String, f64> {
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let parsed = prometheus_parse::Scrape::parse(lines).expect("the Prometheus parser reads it");
    parsed
        .samples
        .into_iter()
        .filter_map(|s| {
            let value = match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => return None,
            };
            let mut labels: Vec<String> = s
                .labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{v}\""))
                .collect();
            labels.sort();
            Some((format!("{}{{{}}}", s.metric, labels.join(",")), value))
        })
        .collect()
}

/// `GET path` with an optional bearer token: the status and the body.
pub async fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("authorization", a)])
        .unwrap_or_default();
    http(addr, "GET", path, &headers, b"").await
}

/// A scrape of `addr`'s `/metrics`, which must answer 200.
pub async fn read(addr: SocketAddr, token: Option<&str>) -> HashMap<String, f64> {
    let (status, body) = get(addr, "/metrics", token).await;
    assert_eq!(status, 200, "{addr}/metrics: {body}");
    scrape(&body)
}

/// The address an agent started with `--metrics-listen` serves its metrics on.
pub async fn agent_addr(agent: &mut Program) -> SocketAddr {
    let line = agent.said("metrics at http://").await;
    line.trim_end_matches("/metrics")
        .rsplit("http://")
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
}
