//! The demo's broker: the one at `--amqp-url` when it answers (the demo then uses an exchange
//! of its own, so its queues never meet anyone else's, and deletes them at the end), else a
//! private RabbitMQ node in a temporary directory when `rabbitmq-server` is installed and we
//! are root.

use super::children::{Children, Interrupt};
use anyhow::{Context, bail};
use convoy_bus::{Bus, BusConfig};
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";

/// The broker the demo uses.
pub struct Broker {
    pub url: String,
    /// A private node's name (for `rabbitmqctl -n`).
    pub node: Option<String>,
    /// A private node's directory (removed when dropped, after the node stopped).
    pub private: Option<tempfile::TempDir>,
}

/// Whether an AMQP broker answers at `url` within `timeout`; the error says why not.
pub fn probe(url: &str, timeout: Duration) -> anyhow::Result<()> {
    let mut config = BusConfig::new(url, "convoy");
    config.tuning.connect_timeout_ms = timeout.as_millis() as u64;
    let bus = Bus::new(config, "convoy demo (probe)")?;
    runtime()?.block_on(async {
        bus.connection().await?;
        bus.close().await;
        Ok::<_, anyhow::Error>(())
    })
}

/// The broker at `url`, or a private node started under `children`.
pub fn ensure(url: &str, children: &mut Children, stop: &Interrupt) -> anyhow::Result<Broker> {
    let why = match probe(url, Duration::from_secs(3)) {
        Ok(()) => {
            return Ok(Broker {
                url: url.to_owned(),
                node: None,
                private: None,
            });
        }
        Err(e) => e,
    };
    let user = nix::unistd::User::from_name("rabbitmq").ok().flatten();
    let (true, Some(user)) = (
        Path::new(SERVER).exists() && nix::unistd::geteuid().is_root(),
        user,
    ) else {
        bail!(
            "no RabbitMQ answers at {} ({why:#}), and a private node needs rabbitmq-server \
             installed and root: run scripts/demo as root (it installs and starts RabbitMQ), \
             start RabbitMQ, or pass --amqp-url",
            convoy_bus::config::redact(url)
        );
    };
    println!(
        "no RabbitMQ answers at {}: starting a private node",
        convoy_bus::config::redact(url)
    );
    let dir = tempfile::Builder::new()
        .prefix("convoy-demo-rmq-")
        .tempdir()
        .context("making a directory for the private broker")?;
    let d = dir.path();
    std::fs::write(d.join("rabbitmq.conf"), "loopback_users = none\n")?;
    std::fs::write(d.join("enabled_plugins"), "[].\n")?;
    for p in [
        d.to_path_buf(),
        d.join("rabbitmq.conf"),
        d.join("enabled_plugins"),
    ] {
        nix::unistd::chown(p.as_path(), Some(user.uid), Some(user.gid))
            .with_context(|| format!("giving {} to the rabbitmq user", p.display()))?;
    }
    let [port, dist_port] = free_ports(2)?[..] else {
        anyhow::bail!("finding free ports: fewer than asked");
    };
    let node = format!("convoy_demo_{}@localhost", std::process::id());
    let mut cmd = Command::new(SERVER);
    cmd.current_dir(d)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", "/var/lib/rabbitmq")
        .env("RABBITMQ_NODENAME", &node)
        .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
        .env("RABBITMQ_NODE_PORT", port.to_string())
        .env("RABBITMQ_DIST_PORT", dist_port.to_string())
        .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
        .env("RABBITMQ_LOG_BASE", d.join("log"))
        .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
        .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
        .env("RABBITMQ_PID_FILE", d.join("node.pid"));
    std::os::unix::process::CommandExt::uid(&mut cmd, user.uid.as_raw());
    std::os::unix::process::CommandExt::gid(&mut cmd, user.gid.as_raw());
    children.spawn_last("rabbitmq", cmd)?;
    let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        stop.check()?;
        children.check()?;
        if probe(&url, Duration::from_secs(2)).is_ok() {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the private RabbitMQ node did not start within 90 s; see {}",
                children.log_path("rabbitmq").display()
            );
        }
        stop.sleep(Duration::from_millis(300))?;
    }
    Ok(Broker {
        url,
        node: Some(node),
        private: Some(dir),
    })
}

/// Deletes the demo's queues and exchanges from a shared broker.
pub fn clean_up(url: &str, exchange: &str, queues: &[String]) -> anyhow::Result<()> {
    let mut config = BusConfig::new(url, exchange);
    config.tuning.connect_timeout_ms = 3_000;
    let bus = Bus::new(config, "convoy demo (clean-up)")?;
    runtime()?.block_on(async {
        let conn = bus.connection().await?;
        let channel = conn.create_channel().await?;
        for q in queues {
            channel
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        for ex in [
            exchange.to_owned(),
            convoy_bus::topology::dead_exchange(exchange),
        ] {
            channel
                .exchange_delete(ex.as_str().into(), ExchangeDeleteOptions::default())
                .await?;
        }
        bus.close().await;
        Ok::<_, anyhow::Error>(())
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// `n` distinct free TCP ports on 127.0.0.1: all bound at once, then released (one at a
/// time, the kernel may hand out the port it just released again).
pub fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .context("finding free ports")?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr().context("finding free ports")?.port()))
        .collect()
}
