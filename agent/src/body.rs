//! Reading the relay's answers, never more than a stated limit: an answer larger than a backhaul
//! relay sends means the relay, or something between it and the agent, is broken or hostile,
//! and the agent gives up on that request (and retries or registers again) instead of
//! buffering it.

use bytes::{Bytes, BytesMut};

/// Largest JSON answer (the registration's [`LinkInfo`](backhaul_common::api::LinkInfo)) read.
pub const MAX_JSON_BODY: usize = 64 * 1024;
/// Most of an error answer's body that is read and kept for the log.
pub const MAX_ERROR_BODY: usize = 4 * 1024;

/// Why an answer's body could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the relay's answer to {what} is over {limit} bytes, more than a backhaul relay sends; is something between agent and relay rewriting traffic?")]
    TooLarge { what: &'static str, limit: usize },
    #[error("the relay's answer to {what} was cut: {why}")]
    Cut { what: &'static str, why: String },
}

/// The whole body of `resp` if it has at most `limit` bytes. `what` names the request for the
/// error ("registration", "a push").
pub async fn read_limited(
    mut resp: reqwest::Response,
    limit: usize,
    what: &'static str,
) -> Result<Bytes, BodyError> {
    if resp.content_length().is_some_and(|len| len > limit as u64) {
        return Err(BodyError::TooLarge { what, limit });
    }
    let mut buf = BytesMut::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if buf.len() + chunk.len() > limit {
                    return Err(BodyError::TooLarge { what, limit });
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(buf.freeze()),
            Err(e) => {
                return Err(BodyError::Cut {
                    what,
                    why: crate::link::describe(&e),
                })
            }
        }
    }
}

/// The start of an error answer's body as text for the log: at most [`MAX_ERROR_BODY`] bytes
/// are read (the rest is left unread, and `[...]` says so); a body cut short gives what came.
pub async fn error_text(mut resp: reqwest::Response) -> String {
    let mut buf = Vec::new();
    let mut truncated = false;
    while let Ok(Some(chunk)) = resp.chunk().await {
        let room = MAX_ERROR_BODY - buf.len();
        if chunk.len() > room {
            buf.extend_from_slice(&chunk[..room]);
            truncated = true;
            break;
        }
        buf.extend_from_slice(&chunk);
    }
    let mut text = String::from_utf8_lossy(&buf).trim().to_string();
    if truncated {
        text.push_str(" [...]");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A response whose body arrives in `chunks`, without a Content-Length.
    fn streamed(chunks: Vec<&'static [u8]>) -> reqwest::Response {
        let stream = futures_util::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<_, std::io::Error>(Bytes::from_static(c))),
        );
        reqwest::Response::from(http::Response::new(reqwest::Body::wrap_stream(stream)))
    }

    #[tokio::test]
    async fn bodies_up_to_the_limit_are_read_whole() {
        let body = read_limited(streamed(vec![b"abc", b"def"]), 6, "a test")
            .await
            .unwrap();
        assert_eq!(&body[..], b"abcdef");
    }

    #[tokio::test]
    async fn larger_bodies_are_refused_without_buffering_them() {
        let err = read_limited(streamed(vec![b"abc", b"defg"]), 6, "a test")
            .await
            .unwrap_err();
        assert!(matches!(err, BodyError::TooLarge { limit: 6, .. }), "{err}");
        assert!(err.to_string().contains("over 6 bytes"), "{err}");
        // A declared length over the limit is refused before any byte is read.
        let declared = reqwest::Response::from(
            http::Response::builder()
                .header(http::header::CONTENT_LENGTH, "7")
                .body(reqwest::Body::from("abcdefg"))
                .unwrap(),
        );
        assert!(matches!(
            read_limited(declared, 6, "a test").await,
            Err(BodyError::TooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn error_text_keeps_only_the_start() {
        assert_eq!(
            error_text(streamed(vec![b" no ", b"entry\n"])).await,
            "no entry"
        );
        let big: &'static [u8] = Box::leak(vec![b'x'; MAX_ERROR_BODY + 10].into_boxed_slice());
        let text = error_text(streamed(vec![b"why: ", big])).await;
        assert!(text.ends_with(" [...]"));
        assert_eq!(text.len(), MAX_ERROR_BODY + " [...]".len());
    }
}
