//! A real HTTP forward proxy (tinyproxy, from Debian's packages) on an ephemeral port, configured
//! to refuse CONNECT, standing for a strict corporate proxy on the agent's way out.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

pub struct ForwardProxy {
    pub addr: SocketAddr,
    pub log: PathBuf,
    child: Child,
}

impl ForwardProxy {
    /// Starts tinyproxy; fails with install instructions if it is missing.
    pub async fn start() -> ForwardProxy {
        let exe = ["/usr/bin/tinyproxy", "/usr/sbin/tinyproxy"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("tinyproxy is not installed: run `apt-get install -y tinyproxy` (scripts/test.sh does)");
        let dir = crate::scratch_dir("tinyproxy");
        // tinyproxy drops privileges to nobody when started as root: let it write its log.
        let _ = std::process::Command::new("chmod")
            .arg("0777")
            .arg(&dir)
            .status();
        let log = dir.join("tinyproxy.log");
        let addr = crate::closed_port();
        let conf = dir.join("tinyproxy.conf");
        std::fs::write(
            &conf,
            format!(
                "User nobody\nGroup nogroup\nPort {port}\nListen 127.0.0.1\nTimeout 120\n\
                 LogFile \"{log}\"\nLogLevel Info\nMaxClients 200\nAllow 127.0.0.1\n\
                 # CONNECT only to port 1 (nothing): every tunnel is refused.\nConnectPort 1\n\
                 DisableViaHeader Yes\n",
                port = addr.port(),
                log = log.display()
            ),
        )
        .expect("write tinyproxy.conf");
        let child = Command::new(exe)
            .arg("-d")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start tinyproxy");
        // Ready when it accepts connections (bounded retries, each a real connect attempt).
        let mut ready = false;
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(
            ready,
            "tinyproxy did not start listening on {addr}; its log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        ForwardProxy { addr, log, child }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a CONNECT to `target` through the proxy and returns the status line.
    pub async fn try_connect(&self, target: SocketAddr) -> String {
        let mut s = tokio::net::TcpStream::connect(self.addr)
            .await
            .expect("connect to proxy");
        s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
            .await
            .expect("write CONNECT");
        let mut buf = vec![0u8; 1024];
        let n = tokio::time::timeout(crate::STEP_TIMEOUT, s.read(&mut buf))
            .await
            .expect("proxy answered CONNECT in time")
            .unwrap_or(0);
        String::from_utf8_lossy(&buf[..n])
            .lines()
            .next()
            .unwrap_or("")
            .to_string()
    }
}

impl Drop for ForwardProxy {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- tinyproxy log -----\n{}", self.log());
        }
        let _ = self.child.start_kill();
    }
}
