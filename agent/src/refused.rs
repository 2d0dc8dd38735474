//! Why a registration failed, and whether waiting can fix it: decided from the relay's answer
//! without IO, so that the agent can say in one line what to do, and back off to minutes (not
//! seconds) on answers that will not change by themselves (a wrong token, a URL that is not a
//! relay).

use std::time::Duration;

/// A failed registration, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// One line for the operator: what happened and what to do.
    pub message: String,
    /// Whether retrying soon can help (the relay restarting, a proxy hiccup) or only a change
    /// of configuration on one side will.
    pub lasting: bool,
}

impl Failure {
    /// A failure only a change of configuration fixes.
    pub fn lasting(message: String) -> Self {
        Self {
            message,
            lasting: true,
        }
    }

    /// A failure that retrying soon may fix.
    pub fn transient(message: String) -> Self {
        Self {
            message,
            lasting: false,
        }
    }
}

/// Retries after a lasting failure start here and double up to [`LASTING_MAX`].
pub const LASTING_INITIAL: Duration = Duration::from_secs(30);
pub const LASTING_MAX: Duration = Duration::from_secs(300);

/// Classifies the relay's non-2xx answer to a registration at `url`: its status, its
/// `Content-Type`, and the start of its body.
pub fn answer(url: &str, status: u16, content_type: &str, body: &str) -> Failure {
    let start = body.trim_start().to_ascii_lowercase();
    let html = content_type.starts_with("text/html")
        || start.starts_with("<!doctype")
        || start.starts_with("<html");
    let said = if html || body.trim().is_empty() {
        String::new()
    } else {
        format!(" (the relay said: {})", one_line(body))
    };
    match status {
        401 => Failure::lasting(format!(
            "the relay refused this agent's credential{said}; check --agent-token-file and --backend-id against the relay's credentials"
        )),
        403 => Failure::lasting(format!("the relay refused the registration{said}")),
        404 if !html && body.contains("nothing at") => Failure::lasting(format!(
            "{url} is not the relay's agent API{said}; give --relay the relay's base URL (e.g. http://relay.example:8080)"
        )),
        426 => Failure::lasting(format!(
            "the relay speaks another protocol version{said}; run the same backhaul version on agent and relay"
        )),
        // A port another backend holds may come free.
        409 => Failure::transient(format!("the relay could not expose the backend{said}")),
        // A relay implements every method it is asked for: 501 comes from something else.
        501 => Failure::lasting(format!(
            "{url} answered 501{}: it is not a backhaul relay; check --relay",
            if html { " with an HTML page" } else { "" }
        )),
        // A proxy's or the relay's trouble that may pass (an nginx 502 page while the relay
        // restarts, a body that timed out, too many requests): soon, whatever the page looks like.
        500..=599 | 408 | 429 => Failure::transient(format!("the relay answered {status}{said}")),
        _ if html => Failure::lasting(format!(
            "{url} answered {status} with an HTML page: it is not a backhaul relay (a web server, or a proxy's error page); check --relay and the proxy settings"
        )),
        404 | 405 => Failure::lasting(format!(
            "{url} answered {status}{said}: it is not a backhaul relay; check --relay"
        )),
        400..=499 => Failure::lasting(format!("the relay answered {status}{said}")),
        _ => Failure::transient(format!("the relay answered {status}{said}")),
    }
}

/// Classifies a registration that got no HTTP answer (`error`: the request error with its
/// causes, as one line).
pub fn no_answer(url: &str, error: &str) -> Failure {
    let e = error.to_ascii_lowercase();
    // rustls reading a plain-HTTP answer where a TLS record should be.
    if url.starts_with("https://")
        && (e.contains("corrupt message")
            || e.contains("invalidcontenttype")
            || e.contains("wrong version number")
            || e.contains("record overflow"))
    {
        return Failure::lasting(format!(
                "{url} did not answer TLS: the relay speaks plain HTTP there; use http:// in --relay (or serve TLS on the relay with --tls-cert)"
            ));
    }
    if e.contains("invalid peer certificate") || e.contains("unknown issuer") {
        return Failure::lasting(format!(
            "the relay's TLS certificate is not trusted ({error}); give the CA with --ca-cert"
        ));
    }
    Failure::transient(format!("could not reach the relay at {url}: {error}"))
}

/// The first line of `text`, at most 200 characters.
fn one_line(text: &str) -> String {
    let line = text.trim().lines().next().unwrap_or_default();
    line.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const URL: &str = "http://relay.example:8080/agent/v1/links";

    #[test]
    fn answers_that_will_not_fix_themselves_are_lasting_and_say_what_to_do() {
        let f = answer(
            URL,
            401,
            "text/plain",
            "the agent's credential is not valid\n",
        );
        assert!(
            f.lasting && f.message.contains("--agent-token-file"),
            "{f:?}"
        );
        assert!(f.message.contains("credential is not valid"), "{f:?}");
        let f = answer(
            URL,
            404,
            "text/plain",
            "nothing at /x/agent/v1/links; frontends ...",
        );
        assert!(f.lasting && f.message.contains("base URL"), "{f:?}");
        let f = answer(
            URL,
            501,
            "text/html",
            "<html><body>Not Implemented</body></html>",
        );
        assert!(
            f.lasting && f.message.contains("not a backhaul relay"),
            "{f:?}"
        );
        assert!(!f.message.contains("<html>"), "no markup in the log: {f:?}");
        let f = answer(URL, 404, "text/plain", "Not Found");
        assert!(
            f.lasting && f.message.contains("not a backhaul relay"),
            "{f:?}"
        );
        let f = answer(URL, 426, "text/plain", "agent speaks protocol 3");
        assert!(
            f.lasting && f.message.contains("same backhaul version"),
            "{f:?}"
        );
    }

    #[test]
    fn answers_that_may_pass_are_retried_soon() {
        assert!(!answer(URL, 503, "text/plain", "restarting").lasting);
        assert!(!answer(URL, 502, "", "").lasting);
        assert!(!answer(URL, 409, "text/plain", "port taken").lasting);
        assert!(!answer(URL, 502, "text/html", "<html>Bad Gateway</html>").lasting);
        assert!(!answer(URL, 408, "text/plain", "the body took too long").lasting);
        assert!(!answer(URL, 429, "text/plain", "slow down").lasting);
        assert!(!no_answer(URL, "error sending request: connection refused").lasting);
    }

    #[test]
    fn tls_to_a_plain_relay_says_so() {
        let f = no_answer(
            "https://relay.example:8080/agent/v1/links",
            "error sending request: client error (Connect): received corrupt message of type InvalidContentType",
        );
        assert!(f.lasting && f.message.contains("plain HTTP"), "{f:?}");
        let f = no_answer(
            "https://relay.example/agent/v1/links",
            "invalid peer certificate: UnknownIssuer",
        );
        assert!(f.message.contains("--ca-cert"), "{f:?}");
    }
}
