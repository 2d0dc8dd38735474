//! A real OpenSSH server (Debian's `openssh-server`) on an ephemeral loopback port, standing for
//! the service an operator puts behind the stack. It runs from a scratch directory with its own
//! configuration, host key and authorized client key, all made by `ssh-keygen`: the system's sshd
//! and `/etc/ssh` are never read or touched. [`Sshd::client`] makes `ssh` and `scp` commands
//! that reach it through a `ProxyCommand`.

use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

/// Where Debian's openssh-server installs the daemon. sshd re-executes itself for every
/// connection, so it must be started by absolute path.
pub const SSHD: &str = "/usr/sbin/sshd";

/// sshd started as root chroots its pre-authentication child here and refuses to start without
/// it. The package's init scripts create it at boot; a container that never ran them has none.
const PRIVSEP_DIR: &str = "/run/sshd";

/// How many ports to try when the one picked was taken before sshd could bind it.
const BIND_ATTEMPTS: usize = 3;

pub struct Sshd {
    pub addr: SocketAddr,
    /// The scratch directory holding its configuration, keys and log; also a place for files
    /// the tests copy with scp (the server runs on this machine).
    pub dir: PathBuf,
    /// The client's private key, authorized for [`Sshd::user`].
    pub client_key: PathBuf,
    /// The user the tests log in as: whoever runs them (an sshd that is not root can only
    /// log in its own user).
    pub user: String,
    log: PathBuf,
    child: Child,
}

impl Sshd {
    /// Makes the keys, writes the configuration and starts sshd; returns once it answers with
    /// an SSH banner. Fails with install instructions if openssh is missing.
    pub async fn start() -> Sshd {
        assert!(
            Path::new(SSHD).exists(),
            "{SSHD} is missing: run `apt-get install -y openssh-server openssh-client` (scripts/test.sh does)"
        );
        let dir = crate::scratch_dir("sshd");
        let host_key = dir.join("host_key");
        let client_key = dir.join("client_key");
        for key in [&host_key, &client_key] {
            run(Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", "backhaul-test", "-f"])
                .arg(key))
            .await;
        }
        let authorized_keys = dir.join("authorized_keys");
        std::fs::copy(client_key.with_extension("pub"), &authorized_keys)
            .expect("write authorized_keys");
        let user = String::from_utf8(run(Command::new("id").arg("-un")).await)
            .expect("user name is UTF-8")
            .trim()
            .to_string();
        if !Path::new(PRIVSEP_DIR).exists() {
            // Only root needs it, and only root can make it: when this fails, sshd's own
            // error says what is wrong.
            let _ = std::fs::DirBuilder::new().mode(0o755).create(PRIVSEP_DIR);
        }

        let log = dir.join("sshd.log");
        let mut attempt = 0;
        loop {
            attempt += 1;
            let addr = crate::closed_port();
            let conf = dir.join("sshd_config");
            std::fs::write(
                &conf,
                format!(
                    "ListenAddress {addr}\n\
                     HostKey {host_key}\n\
                     AuthorizedKeysFile {authorized_keys}\n\
                     PidFile none\n\
                     # PAM would want a login session set up for a real system user.\n\
                     UsePAM no\n\
                     # The scratch directory's parents are not checked for sshd's modes.\n\
                     StrictModes no\n\
                     PubkeyAuthentication yes\n\
                     PasswordAuthentication no\n\
                     KbdInteractiveAuthentication no\n\
                     # The tests may run as root; keys only, as Debian's default.\n\
                     PermitRootLogin prohibit-password\n\
                     # scp speaks SFTP since OpenSSH 9.0; built in, so no helper path.\n\
                     Subsystem sftp internal-sftp\n\
                     LogLevel VERBOSE\n",
                    host_key = host_key.display(),
                    authorized_keys = authorized_keys.display(),
                ),
            )
            .expect("write sshd_config");
            let mut child = Command::new(SSHD)
                .arg("-D")
                .arg("-e")
                .arg("-f")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(std::fs::File::create(&log).expect("sshd log")))
                .kill_on_drop(true)
                .spawn()
                .expect("start sshd");
            match wait_ready(&mut child, addr).await {
                Ok(()) => {
                    return Sshd {
                        addr,
                        dir,
                        client_key,
                        user,
                        log,
                        child,
                    }
                }
                Err(why) => {
                    let _ = child.kill().await;
                    let log = std::fs::read_to_string(&log).unwrap_or_default();
                    // Another test may have taken the port between closed_port() and sshd's bind.
                    if attempt < BIND_ATTEMPTS && log.contains("Address already in use") {
                        continue;
                    }
                    panic!("sshd on {addr} {why}; its log:\n{log}");
                }
            }
        }
    }

    /// What sshd logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `user@host` for ssh and scp. The host name is never resolved: the ProxyCommand carries
    /// the connection.
    pub fn destination(&self) -> String {
        format!("{}@backhaul-test", self.user)
    }

    /// `program` (`ssh` or `scp`) set up to log in with the client key and to reach the server
    /// through `proxy_command` only: no user or system configuration, no agent, no known-hosts
    /// file, no prompts.
    pub fn client(&self, program: &str, proxy_command: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.arg("-F")
            .arg("/dev/null")
            .arg("-i")
            .arg(&self.client_key)
            .args([
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "LogLevel=ERROR",
            ])
            .arg("-o")
            .arg(format!("ProxyCommand={proxy_command}"))
            .env_remove("SSH_AUTH_SOCK")
            .kill_on_drop(true);
        for var in crate::PROXY_VARS.iter().chain(&["BACKHAUL_CLIENT_TOKEN"]) {
            cmd.env_remove(var);
        }
        cmd
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- log of sshd -----\n{}", self.log());
        }
        let _ = self.child.start_kill();
    }
}

/// Runs a setup command to completion; returns its stdout.
async fn run(cmd: &mut Command) -> Vec<u8> {
    let out = tokio::time::timeout(crate::STEP_TIMEOUT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{cmd:?} did not finish within {:?}", crate::STEP_TIMEOUT))
        .unwrap_or_else(|e| panic!("could not run {cmd:?} (is openssh-client installed?): {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Waits until sshd answers on `addr` with an SSH banner (bounded retries, each a real connect),
/// or says why it will not.
async fn wait_ready(child: &mut Child, addr: SocketAddr) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + crate::READY_TIMEOUT;
    while tokio::time::Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited with {status}"));
        }
        if let Ok(mut c) = tokio::net::TcpStream::connect(addr).await {
            let mut banner = [0u8; 8];
            return match tokio::time::timeout(crate::READY_TIMEOUT, c.read_exact(&mut banner)).await
            {
                Ok(Ok(_)) if &banner == b"SSH-2.0-" => Ok(()),
                Ok(Ok(_)) => Err(format!(
                    "answered with {:?}, not an SSH banner",
                    String::from_utf8_lossy(&banner)
                )),
                Ok(Err(e)) => Err(format!("closed the connection before its banner: {e}")),
                Err(_) => Err("sent no banner".to_string()),
            };
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Err(format!(
        "did not accept connections within {:?}",
        crate::READY_TIMEOUT
    ))
}
