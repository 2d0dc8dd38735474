//! The `/status` page: every backend, its agents and sessions, and the latest refusals, as one
//! self-contained HTML page (no scripts, no external assets; readable on a phone). Everything
//! shown that came from the network is escaped.

use crate::hub::Hub;
use crate::metrics::BytesLabels;
use http::{header, HeaderValue, Response, StatusCode};
use std::fmt::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Escapes text for HTML element content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A duration as people say it: `45 s`, `12 min`, `3 h 20 min`, `2 d 4 h`.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=119 => format!("{s} s"),
        120..=3599 => format!("{} min", s / 60),
        3600..=86_399 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86_400, s % 86_400 / 3600),
    }
}

/// Bytes as people say them: `512 B`, `3.2 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// UTC time of day, `HH:MM:SS`.
fn clock(t: SystemTime) -> String {
    let s = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    format!("{:02}:{:02}:{:02}", s / 3600 % 24, s / 60 % 60, s % 60)
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:0 auto;padding:1em;max-width:60em;color:#222}\
h1{font-size:1.3em}h2{font-size:1.1em;margin-top:1.5em;border-bottom:1px solid #ccc}\
table{border-collapse:collapse;width:100%;font-size:.9em}td,th{text-align:left;padding:.3em .5em;border-bottom:1px solid #eee;vertical-align:top}\
.wrap{overflow-x:auto}.muted{color:#777}.ok{color:#176f2c}.warn{color:#a15c00}code{font-size:.95em}\
@media (max-width:640px){table.cards,.cards tbody,.cards tr,.cards td{display:block}.cards tr:first-child{display:none}\
.cards tr{border:1px solid #ddd;border-radius:.4em;margin:.5em 0;padding:.3em}.cards td{border:0;padding:.15em .4em}\
.cards td::before{content:attr(data-l);display:inline-block;min-width:7em;color:#777}}";

/// `n thing` or `n things`.
fn count(n: usize, thing: &str) -> String {
    if n == 1 {
        format!("1 {thing}")
    } else {
        format!("{n} {thing}s")
    }
}

/// The page, from the hub's state now.
pub fn page(hub: &Hub) -> Response<crate::http::Body> {
    let backends = hub.snapshot();
    let m = &hub.metrics;
    let mut html = String::new();
    let agents: usize = backends.iter().map(|b| b.links.len()).sum();
    let sessions: usize = backends.iter().map(|b| b.sessions).sum();
    let _ = write!(
        html,
        "<!doctype html><html lang=en><head><meta charset=utf-8>\
         <meta name=viewport content=\"width=device-width,initial-scale=1\">\
         <title>backhaul relay status</title><style>{STYLE}</style></head><body>\
         <h1>backhaul relay {}</h1>\
         <p>{}, {}, {} open. As of {} UTC.</p>",
        escape(backhaul_common::VERSION),
        count(backends.len(), "backend"),
        count(agents, "agent link"),
        count(sessions, "session"),
        clock(SystemTime::now()),
    );
    if backends.is_empty() {
        html.push_str("<p class=muted>No agent is registered and no session is open.</p>");
    }
    for b in &backends {
        let label = m.backend(&b.id);
        let moved = |direction| {
            m.session_bytes
                .get_or_create(&BytesLabels {
                    backend: label.backend.clone(),
                    direction,
                })
                .get()
        };
        let opened = m.sessions_opened.get_or_create(&label).get();
        let _ = write!(
            html,
            "<h2>{}</h2><p>{} open{} &middot; {opened} opened &middot; ended sessions carried {} to the backend, {} to clients</p>",
            escape(&b.id),
            b.sessions,
            if b.pending > 0 {
                format!(" ({} waiting for an agent)", b.pending)
            } else {
                String::new()
            },
            bytes(moved("to_backend")),
            bytes(moved("to_client")),
        );
        if b.links.is_empty() {
            html.push_str("<p class=warn>No agent is connected: new sessions are refused.</p>");
            continue;
        }
        html.push_str(
            "<div class=wrap><table class=cards><tr><th>agent</th><th>address</th><th>transport</th>\
             <th>connected</th><th>last seen</th><th>sessions</th></tr>",
        );
        for l in &b.links {
            let _ = write!(
                html,
                "<tr><td data-l=agent>{}<br><span class=muted>link {}</span></td>\
                 <td data-l=address>{}</td><td data-l=transport>{}</td><td data-l=connected>{}</td>\
                 <td data-l=\"last seen\" class={}>{} ago</td><td data-l=sessions>{}</td></tr>",
                escape(&l.agent),
                escape(&l.id),
                escape(&l.addr.to_string()),
                l.transport.map_or("none yet", |t| t.label()),
                human(l.connected_for),
                if l.last_seen < Duration::from_secs(5) {
                    "ok"
                } else {
                    "warn"
                },
                human(l.last_seen),
                l.sessions,
            );
        }
        html.push_str("</table></div>");
    }
    html.push_str("<h2>Recent refusals</h2>");
    let refusals = m.recent_refusals();
    if refusals.is_empty() {
        html.push_str("<p class=muted>None since the relay started.</p>");
    } else {
        html.push_str("<div class=wrap><table class=cards><tr><th>time (UTC)</th><th>reason</th><th>what</th></tr>");
        for r in &refusals {
            let _ = write!(
                html,
                "<tr><td data-l=\"time (UTC)\">{}</td><td data-l=reason><code>{}</code></td><td data-l=what>{}</td></tr>",
                clock(r.at),
                r.reason,
                escape(&r.detail),
            );
        }
        html.push_str("</table></div>");
    }
    html.push_str(
        "<p class=muted>Counters for monitoring: <code>/metrics</code> (Prometheus text format).</p></body></html>",
    );
    let mut resp = Response::new(crate::http::full(html));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_text_is_escaped_and_figures_read_well() {
        assert_eq!(
            escape("<script>\"x\"&'y'</script>"),
            "&lt;script&gt;&quot;x&quot;&amp;&#39;y&#39;&lt;/script&gt;"
        );
        assert_eq!(human(Duration::from_secs(45)), "45 s");
        assert_eq!(human(Duration::from_secs(750)), "12 min");
        assert_eq!(human(Duration::from_secs(12_000)), "3 h 20 min");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 * 1024 * 1024 + 200_000), "3.2 MiB");
    }
}
