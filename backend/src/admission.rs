//! Which WebSocket handshakes the backend serves, decided before the upgrade and without IO:
//! the agent's `--backend-secret` and the client's `Origin`.

use backhaul_common::api::BACKEND_SECRET_HEADER;
use backhaul_common::secret::SecretHash;
use http::{header, HeaderMap, StatusCode};

/// Longest piece of a client's header repeated in a log line.
const MAX_LOGGED_VALUE: usize = 200;

/// The origins `--allow-origin` lets in.
#[derive(Debug, Clone, Default)]
pub struct OriginPolicy {
    any: bool,
    /// ASCII serializations (`scheme://host[:port]`, default port left out), as browsers send.
    allowed: Vec<String>,
}

impl OriginPolicy {
    /// From the `--allow-origin` values: `*`, or origins such as `https://app.example:8443`.
    pub fn parse(values: &[String]) -> Result<Self, String> {
        let mut policy = OriginPolicy::default();
        for v in values.iter().map(|v| v.trim()) {
            if v == "*" {
                policy.any = true;
                continue;
            }
            let bad = || {
                format!("--allow-origin {v:?} is not an origin; give scheme://host[:port] (e.g. https://app.example) or *")
            };
            let url = url::Url::parse(v).map_err(|_| bad())?;
            let plain = url.username().is_empty()
                && url.password().is_none()
                && url.path() == "/"
                && url.query().is_none()
                && url.fragment().is_none()
                && !v.ends_with('/');
            match canonical(v) {
                Some(origin) if plain => policy.allowed.push(origin),
                _ => return Err(bad()),
            }
        }
        Ok(policy)
    }

    /// Whether a handshake with this `Origin` header value may go on.
    pub fn allows(&self, origin: &str) -> bool {
        self.any || canonical(origin).is_some_and(|o| self.allowed.contains(&o))
    }
}

/// `scheme://host[:port]` of an origin, lower-case and without a default port; `None` for
/// anything that is not a tuple origin (such as `null`).
fn canonical(origin: &str) -> Option<String> {
    let url = url::Url::parse(origin.trim()).ok()?;
    let origin = url.origin();
    origin.is_tuple().then(|| origin.ascii_serialization())
}

/// Why a handshake was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No `X-Backhaul-Secret` (or more than one) while `--backend-secret` is set.
    MissingSecret,
    WrongSecret,
    /// An `Origin` that `--allow-origin` does not allow (clipped and escaped for the log).
    Origin(String),
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::MissingSecret | Refusal::WrongSecret => StatusCode::UNAUTHORIZED,
            Refusal::Origin(_) => StatusCode::FORBIDDEN,
        }
    }

    /// The response body: what the peer needs, nothing about this backend.
    pub fn body(&self) -> &'static str {
        match self {
            Refusal::MissingSecret | Refusal::WrongSecret => {
                "backhaul-backend requires the secret it was started with (agent --backend-secret)"
            }
            Refusal::Origin(_) => "this Origin is not allowed (backhaul-backend --allow-origin)",
        }
    }

    /// The log's account: what was wrong and what the operator can do about it.
    pub fn explain(&self) -> String {
        match self {
            Refusal::MissingSecret => "no X-Backhaul-Secret header: not our agent, or an agent started without --backend-secret (it needs the same one as this backend)".to_string(),
            Refusal::WrongSecret => "wrong X-Backhaul-Secret: the agent's --backend-secret must be the same as this backend's".to_string(),
            Refusal::Origin(origin) => format!(
                "Origin {origin} is not allowed; if that browser app should reach this backend, add --allow-origin with its origin"
            ),
        }
    }
}

/// Decides whether a handshake with `headers` may go on: the secret first (a handshake
/// without it does not come from our agent), then every `Origin` header.
pub fn admit(
    headers: &HeaderMap,
    secret: Option<&SecretHash>,
    origins: &OriginPolicy,
) -> Result<(), Refusal> {
    if let Some(expected) = secret {
        let mut presented = headers.get_all(BACKEND_SECRET_HEADER).iter();
        match (presented.next(), presented.next()) {
            (Some(v), None) => {
                if !SecretHash::of(v.as_bytes()).matches(expected) {
                    return Err(Refusal::WrongSecret);
                }
            }
            _ => return Err(Refusal::MissingSecret),
        }
    }
    for origin in headers.get_all(header::ORIGIN) {
        let allowed = origin.to_str().is_ok_and(|o| origins.allows(o));
        if !allowed {
            return Err(Refusal::Origin(loggable(origin.as_bytes())));
        }
    }
    Ok(())
}

/// A client's header value for the log: quoted, escaped, and clipped.
pub fn loggable(value: &[u8]) -> String {
    let text = String::from_utf8_lossy(value);
    let clipped: String = text.chars().take(MAX_LOGGED_VALUE).collect();
    let more = if clipped.len() < text.len() {
        "..."
    } else {
        ""
    };
    format!("{clipped:?}{more}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn policy(values: &[&str]) -> OriginPolicy {
        OriginPolicy::parse(&values.iter().map(|v| v.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn allowed_origins_compare_as_browsers_send_them() {
        let p = policy(&["https://App.Example", "http://localhost:8080"]);
        assert!(p.allows("https://app.example"));
        assert!(p.allows("https://app.example:443"));
        assert!(p.allows("http://localhost:8080"));
        assert!(!p.allows("http://app.example"));
        assert!(!p.allows("https://app.example:8443"));
        assert!(!p.allows("https://evil.example"));
        assert!(!p.allows("https://app.example.evil.example"));
        assert!(!p.allows("null"));
        assert!(!p.allows(""));
        assert!(policy(&["*"]).allows("null"));
        assert!(!policy(&[]).allows("https://app.example"));
    }

    #[test]
    fn allow_origin_takes_only_origins() {
        for bad in [
            "app.example",
            "https://app.example/",
            "https://app.example/path",
            "https://app.example?q",
            "https://user@app.example",
            "null",
            "",
        ] {
            assert!(
                OriginPolicy::parse(&[bad.to_string()]).is_err(),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn the_secret_comes_first_then_every_origin() {
        let secret = SecretHash::of(b"s3cret");
        let none = OriginPolicy::default();
        assert_eq!(admit(&headers(&[]), None, &none), Ok(()));
        assert_eq!(
            admit(&headers(&[]), Some(&secret), &none),
            Err(Refusal::MissingSecret)
        );
        assert_eq!(
            admit(
                &headers(&[("x-backhaul-secret", "guess")]),
                Some(&secret),
                &none
            ),
            Err(Refusal::WrongSecret)
        );
        assert_eq!(
            admit(
                &headers(&[
                    ("X-Backhaul-Secret", "s3cret"),
                    ("x-backhaul-secret", "s3cret")
                ]),
                Some(&secret),
                &none
            ),
            Err(Refusal::MissingSecret)
        );
        let ok = [("x-backhaul-secret", "s3cret")];
        assert_eq!(admit(&headers(&ok), Some(&secret), &none), Ok(()));
        // Without the secret, the Origin is not even looked at.
        assert_eq!(
            admit(&headers(&[("origin", "https://x")]), Some(&secret), &none),
            Err(Refusal::MissingSecret)
        );
        let with_origin = [ok[0], ("origin", "https://evil.example")];
        assert_eq!(
            admit(&headers(&with_origin), Some(&secret), &none),
            Err(Refusal::Origin("\"https://evil.example\"".into()))
        );
        let app = policy(&["https://app.example"]);
        let two = [
            ("origin", "https://app.example"),
            ("origin", "https://evil.example"),
        ];
        assert!(admit(&headers(&two), None, &app).is_err());
        assert_eq!(admit(&headers(&two[..1]), None, &app), Ok(()));
        assert_eq!(Refusal::WrongSecret.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            Refusal::Origin(String::new()).status(),
            StatusCode::FORBIDDEN
        );
    }

    #[test]
    fn logged_values_are_escaped_and_clipped() {
        assert_eq!(loggable(b"a\nb"), "\"a\\nb\"");
        let long = loggable("x".repeat(500).as_bytes());
        assert!(long.ends_with("\"...") && long.len() < 220, "{long}");
    }
}
