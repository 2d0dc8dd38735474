//! `backhaul-frontend --stdio` as ssh's ProxyCommand: every chunk must reach stdout at once,
//! newline or not (ssh waits for the server's key exchange replies, which never end in one), and
//! the frontend must exit when the session ends. Checked with bare writes to its stdin, then with
//! a real OpenSSH server behind the whole stack and the real ssh and scp in front of it.

use backhaul_tests::checks::step;
use backhaul_tests::sshd::Sshd;
use backhaul_tests::{data, s, Program, Stack, StackOptions, STEP_TIMEOUT};
use std::process::{Output, Stdio};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

const MIB: u64 = 1 << 20;
const CLIENT_TOKEN: &str = "stdio-client-secret";

/// The frontend's arguments for one session to the stack's backend over stdin/stdout.
fn stdio_args(stack: &Stack) -> Vec<String> {
    vec![
        s("--stdio"),
        s("--relay"),
        stack.relay_url(),
        s("--backend-id"),
        stack.backend_id.clone(),
    ]
}

/// The same, as the ProxyCommand line ssh hands to a shell.
fn proxy_command(stack: &Stack) -> String {
    let exe = backhaul_tests::bin("backhaul-frontend")
        .display()
        .to_string();
    // ssh expands %-tokens in the line, and the shell would split the path on quotes.
    assert!(
        !exe.contains(['%', '\'']),
        "unusable path for a ProxyCommand: {exe}"
    );
    let mut line = format!("'{exe}'");
    for arg in stdio_args(stack) {
        line.push(' ');
        line.push_str(&arg);
    }
    line
}

/// Runs an ssh or scp command to the end, writing `input` (that many bytes of stream `seed`) to
/// its stdin if given, else giving it no stdin.
async fn run_client(what: &str, mut cmd: Command, input: Option<(u64, u64)>) -> Output {
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("could not start {what} (is openssh-client installed?): {e}"));
    if let (Some((seed, len)), Some(mut stdin)) = (input, child.stdin.take()) {
        // A failed write shows up as the command's failure, with its stderr.
        tokio::spawn(async move { data::send(&mut stdin, seed, len).await });
    }
    step(what, child.wait_with_output()).await.unwrap()
}

fn expect_success(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed with {}; its stderr (ssh's and the frontend's):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Small writes without a newline, on a stdin kept open, each come back through the echo service
/// before the next is written: nothing waits in a line buffer. Closing stdin then ends the
/// session, and the frontend exits by itself with status 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdio_echoes_each_write_without_waiting_for_a_newline() {
    let stack = Stack::start(StackOptions::default()).await;
    let (mut frontend, mut stdin, mut stdout) =
        Program::spawn_piped("backhaul-frontend", &stdio_args(&stack), &[]);
    for round in 0..5u8 {
        // Bytes an ssh peer might send: binary, no newline, shorter than any buffer.
        let mut msg = format!("round {round}, no newline:").into_bytes();
        msg.extend([0, round, 0x7f, 0xff]);
        step("write to the frontend's stdin", stdin.write_all(&msg))
            .await
            .unwrap();
        step("flush the frontend's stdin", stdin.flush())
            .await
            .unwrap();
        let mut echoed = vec![0; msg.len()];
        step(
            &format!("the echo of round {round} (bytes without a newline held back?)"),
            stdout.read_exact(&mut echoed),
        )
        .await
        .unwrap_or_else(|e| panic!("stdout ended before the echo of round {round}: {e}"));
        assert_eq!(echoed, msg, "round {round} came back altered");
    }
    drop(stdin);
    let mut rest = Vec::new();
    step(
        "the end of the frontend's stdout after stdin closed",
        stdout.read_to_end(&mut rest),
    )
    .await
    .unwrap();
    assert!(
        rest.is_empty(),
        "{} bytes came back that were never sent",
        rest.len()
    );
    assert_eq!(
        frontend.wait().await,
        Some(0),
        "the frontend must exit cleanly once the session has ended"
    );
}

/// A real OpenSSH session end to end: ssh -> frontend --stdio (ProxyCommand) -> relay -> agent ->
/// backend -> sshd. 8 MiB go through `sha256sum` on the far end, then 8 MiB up and back down
/// with scp, each checked by hash. The relay demands a client token, which ssh hands to its
/// ProxyCommand through the environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_and_scp_through_the_stack() {
    let sshd = Sshd::start().await;
    let stack = Stack::start(StackOptions {
        target: Some(sshd.addr),
        relay_args: vec![s("--client-token"), s(CLIENT_TOKEN)],
        ..Default::default()
    })
    .await;
    let proxy = proxy_command(&stack);
    let dest = sshd.destination();
    let token = [("BACKHAUL_CLIENT_TOKEN", CLIENT_TOKEN)];

    // Without the token the relay turns the frontend away: the token below is what lets ssh in.
    let what = "ssh without the client token";
    let mut cmd = sshd.client("ssh", &proxy);
    cmd.arg(&dest).arg("true");
    let out = run_client(what, cmd, None).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{what} got in; stderr:\n{stderr}");
    assert!(
        stderr.contains("401"),
        "the frontend should say the relay refused it; stderr:\n{stderr}"
    );

    let what = "ssh piping 8 MiB through sha256sum";
    let mut cmd = sshd.client("ssh", &proxy);
    cmd.envs(token).arg(&dest).arg("sha256sum");
    let out = run_client(what, cmd, Some((80, 8 * MIB))).await;
    expect_success(what, &out);
    let far = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        far.split_whitespace().next(),
        Some(data::expected_hash(80, 8 * MIB).as_str()),
        "sha256sum on the far end printed {far:?}"
    );

    // The server runs on this machine, so its files are ours to write and read.
    let sent = data::bytes(81, 8 * MIB as usize);
    let local = sshd.dir.join("up.bin");
    let remote = sshd.dir.join("remote.bin");
    let back = sshd.dir.join("down.bin");
    std::fs::write(&local, &sent).unwrap();
    let what = "scp of 8 MiB up";
    let mut cmd = sshd.client("scp", &proxy);
    cmd.envs(token)
        .arg(&local)
        .arg(format!("{dest}:{}", remote.display()));
    expect_success(what, &run_client(what, cmd, None).await);
    assert_eq!(
        data::hash(&std::fs::read(&remote).unwrap()),
        data::hash(&sent),
        "the uploaded file differs from the sent one"
    );
    let what = "scp of 8 MiB down";
    let mut cmd = sshd.client("scp", &proxy);
    cmd.envs(token)
        .arg(format!("{dest}:{}", remote.display()))
        .arg(&back);
    expect_success(what, &run_client(what, cmd, None).await);
    assert_eq!(
        data::hash(&std::fs::read(&back).unwrap()),
        data::hash(&sent),
        "the downloaded file differs from the sent one"
    );

    // Each of the three sessions went through the backend, not around the stack.
    // The backend logs a session once its close handshake is over, maybe after ssh has gone.
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    let sessions = || stack.backend.stderr().matches("session ended").count();
    while sessions() < 3 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(sessions(), 3, "backend log:\n{}", stack.backend.stderr());
    for f in [local, remote, back] {
        let _ = std::fs::remove_file(f);
    }
}
