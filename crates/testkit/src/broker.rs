//! A private RabbitMQ node for tests that stop, kill or restart the broker. The shared
//! broker on 5672 is never touched.
//!
//! The node runs as the `rabbitmq` user from a temp dir it owns, on free ports, with its own
//! config (no listeners from `/etc/rabbitmq`), no plugins, and the system cookie.

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, User, chown};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";

/// A private broker node; killed and removed on drop.
pub struct BrokerNode {
    dir: tempfile::TempDir,
    name: String,
    port: u16,
    dist_port: u16,
    child: Option<Child>,
}

impl BrokerNode {
    /// Whether this machine can run a private node (RabbitMQ installed, running as root).
    pub fn available() -> bool {
        Path::new(SERVER).exists()
            && nix::unistd::geteuid().is_root()
            && User::from_name("rabbitmq").ok().flatten().is_some()
    }

    /// Starts a node and waits until it accepts AMQP connections.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(|_| Ok(String::new())).await
    }

    /// Starts a node whose `rabbitmq.conf` gets the lines `extra` returns; `extra` is given
    /// the node's directory (owned by `rabbitmq`) to put files such as certificates in.
    pub async fn start_with(
        extra: impl FnOnce(&Path) -> anyhow::Result<String>,
    ) -> anyhow::Result<Self> {
        if !Self::available() {
            bail!(
                "a private RabbitMQ node needs rabbitmq-server installed and root (run scripts/test)"
            );
        }
        let user = User::from_name("rabbitmq")?.context("no rabbitmq user")?;
        let dir = tempfile::Builder::new().prefix("convoy-rmq-").tempdir()?;
        chown(dir.path(), Some(user.uid), Some(user.gid))?;
        let conf = dir.path().join("rabbitmq.conf");
        let more = extra(dir.path())?;
        std::fs::write(&conf, format!("loopback_users = none\n{more}\n"))?;
        for entry in std::fs::read_dir(dir.path())?.flatten() {
            chown(entry.path().as_path(), Some(user.uid), Some(user.gid))?;
        }
        let plugins = dir.path().join("enabled_plugins");
        std::fs::write(&plugins, "[].\n")?;
        for f in [&conf, &plugins] {
            chown(f.as_path(), Some(user.uid), Some(user.gid))?;
        }
        let mut node = Self {
            name: format!("{}@localhost", crate::unique("convoy").replace('-', "_")),
            port: crate::free_port(),
            dist_port: crate::free_port(),
            dir,
            child: None,
        };
        node.boot().await?;
        Ok(node)
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The node's directory (config, data, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.path().join("node.pid")
    }

    fn pid(&self) -> Option<Pid> {
        std::fs::read_to_string(self.pid_file())
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .map(Pid::from_raw)
    }

    /// Starts (or restarts) the node on the same ports and data, and waits until it is up.
    pub async fn boot(&mut self) -> anyhow::Result<()> {
        let user = User::from_name("rabbitmq")?.context("no rabbitmq user")?;
        let d = self.dir.path();
        let _ = std::fs::remove_file(self.pid_file());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("console.log"))?;
        let child = Command::new(SERVER)
            .current_dir(d)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", "/var/lib/rabbitmq")
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", self.pid_file())
            .uid(user.uid.as_raw())
            .gid(user.gid.as_raw())
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting rabbitmq-server")?;
        self.child = Some(child);
        let url = self.url();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        loop {
            let probe = lapin::Connection::connect(&url, lapin::ConnectionProperties::default());
            if let Ok(Ok(conn)) = tokio::time::timeout(Duration::from_secs(2), probe).await {
                let _ = conn.close(200, "probe".into()).await;
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                bail!(
                    "rabbitmq-server exited with {status}; see {}",
                    d.join("console.log").display()
                );
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "private broker did not start in 90 s; see {}",
                    d.join("console.log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Stops the node gracefully (SIGTERM) and waits for it to exit.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        self.signal_and_wait(Signal::SIGTERM, Duration::from_secs(60))
            .await
    }

    /// Kills the node with SIGKILL: no goodbye to clients, nothing flushed that was not.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.signal_and_wait(Signal::SIGKILL, Duration::from_secs(20))
            .await
    }

    async fn signal_and_wait(&mut self, sig: Signal, timeout: Duration) -> anyhow::Result<()> {
        if let Some(pid) = self.pid() {
            let _ = kill(pid, sig);
        }
        if let Some(mut child) = self.child.take() {
            let child_pid = Pid::from_raw(child.id() as i32);
            let _ = kill(child_pid, sig);
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    let _ = kill(Pid::from_raw(-child_pid.as_raw()), Signal::SIGKILL);
                    let _ = child.wait();
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        // The port must be free before a restart.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            if tokio::time::Instant::now() > deadline {
                bail!("broker port {} still open after stop", self.port);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }
}

impl Drop for BrokerNode {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = kill(pid, Signal::SIGKILL);
        }
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(-(child.id() as i32)), Signal::SIGKILL);
            let _ = child.wait();
        }
    }
}
