//! Checks the end-to-end tests (tests/tests/*.rs) are made of: an echo transfer verified by
//! hash, a half-close whose reply must come back, a client that must be turned away promptly,
//! a program that must refuse its command line with exit 64, a backend with extra flags, a
//! secret in a private file.

use crate::{bin, data, s, scratch_dir, Program, PROXY_VARS, STEP_TIMEOUT};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// `fut`, or a failed test naming `what` after [`STEP_TIMEOUT`].
pub async fn step<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    timeout(STEP_TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {STEP_TIMEOUT:?}"))
}

/// Sends `len` bytes of stream `seed` through `entry` (an echo service behind it) while reading
/// the echo; checks that what came back hashes like what was sent.
pub async fn echo_transfer(entry: SocketAddr, seed: u64, len: u64) {
    let stream = step("connect", TcpStream::connect(entry)).await.unwrap();
    let (mut r, mut w) = stream.into_split();
    let sender = tokio::spawn(async move { data::send(&mut w, seed, len).await });
    let (got, got_hash) = step("echo transfer", data::receive(&mut r)).await.unwrap();
    let sent_hash = sender.await.unwrap().unwrap();
    assert_eq!(got, len, "echo returned {got} of {len} bytes");
    assert_eq!(
        got_hash, sent_hash,
        "echoed bytes differ from the sent ones"
    );
    assert_eq!(sent_hash, data::expected_hash(seed, len));
}

/// Sends `len` bytes of stream `seed` through `entry` to a [`crate::services::reply_after_eof`]
/// service answering with `reply_len` bytes of stream `reply_seed`, then shuts down its sending
/// side (as `nc -N` or an HTTP/1.0 client does): the service must have got every byte, and its
/// reply after the half-close must come back whole.
pub async fn half_close_then_reply(
    entry: SocketAddr,
    seed: u64,
    len: u64,
    reply_seed: u64,
    reply_len: u64,
) {
    let c = step("connect", TcpStream::connect(entry)).await.unwrap();
    let (mut r, mut w) = c.into_split();
    let sent_hash = step("send request", data::send(&mut w, seed, len))
        .await
        .unwrap();
    let mut hash = [0u8; 64];
    step("service's hash of our request", r.read_exact(&mut hash))
        .await
        .unwrap();
    assert_eq!(std::str::from_utf8(&hash).unwrap(), sent_hash);
    let (got, reply_hash) = step("reply after half-close", data::receive(&mut r))
        .await
        .unwrap();
    assert_eq!(got, reply_len);
    assert_eq!(reply_hash, data::expected_hash(reply_seed, reply_len));
}

/// A client of `entry` that sends `hello` must see its connection end (end of stream or reset)
/// within 10 s, with nothing carried back; `why` says what would be wrong otherwise.
pub async fn expect_closed_promptly(entry: SocketAddr, hello: &[u8], why: &str) {
    let mut c = step("connect", TcpStream::connect(entry)).await.unwrap();
    let _ = c.write_all(hello).await;
    let mut buf = Vec::new();
    let r = timeout(Duration::from_secs(10), c.read_to_end(&mut buf)).await;
    assert!(r.is_ok(), "{why}");
    assert!(buf.is_empty(), "a refused session carried bytes back");
}

/// Runs `program` with `args` and `env`, which it must refuse: exit code 64 (EX_USAGE), no
/// panic, no ready line. Returns its stderr.
pub async fn refuses_to_start(program: &str, args: &[String], env: &[(String, String)]) -> String {
    let mut cmd = tokio::process::Command::new(bin(program));
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    for var in PROXY_VARS {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = step(&format!("{program} {args:?} exiting"), cmd.output())
        .await
        .unwrap_or_else(|e| panic!("could not run {program}: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(64),
        "{program} {args:?} {env:?}: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{program} panicked: {stderr}");
    assert!(
        !stdout.contains("listening on"),
        "{program} started: {stdout}"
    );
    stderr
}

/// Starts a backend on 127.0.0.1:0 in front of `target`, with extra arguments.
pub async fn backend_with(
    target: SocketAddr,
    extra: &[String],
    env: &[(String, String)],
) -> Program {
    let mut args = vec![s("--listen"), s("127.0.0.1:0"), s("--target"), s(target)];
    args.extend(extra.iter().cloned());
    Program::listening("backhaul-backend", &args, env).await
}

/// Writes `contents` to a new file readable only by its owner, as a secret file should be.
pub fn private_file(name: &str, contents: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = scratch_dir("secret").join(name);
    std::fs::write(&path, contents).expect("write secret file");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .expect("chmod secret file");
    path
}
