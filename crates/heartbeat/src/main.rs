//! `convoy-heartbeat`: publishes this host's liveness, labels and running releases on
//! `heartbeat.<host>` every `interval_s` seconds. The conductor derives fleet membership
//! (alive / stale / gone) from it. It replaces the cron keepalive hack: one timer, one
//! small message, nothing else awake in between.

use chrono::Utc;
use clap::Parser;
use convoy_bus::{
    Bus, BusConfig, BusTuning, DEFAULT_AMQP_URL, DEFAULT_EXCHANGE, Outgoing, PublishError,
    Publisher,
};
use convoy_daemon::{ConfigArgs, Lifecycle, logging};
use convoy_message::names::{HostName, Name};
use convoy_message::{Body, Heartbeat, Message};
use convoy_release::AppRoot;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// `/etc/convoy/heartbeat.toml`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Config {
    amqp_url: String,
    exchange: String,
    /// This host's name (default: the system host name).
    host: Option<String>,
    /// Seconds between heartbeats.
    interval_s: u32,
    /// role, stage, datacentre… — what stages select hosts by.
    labels: BTreeMap<String, String>,
    /// App → root. When empty, the roots are read from `agent_config`.
    apps: BTreeMap<String, PathBuf>,
    /// The agent's config, to find app roots without repeating them.
    agent_config: PathBuf,
    bus: BusTuning,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            amqp_url: DEFAULT_AMQP_URL.into(),
            exchange: DEFAULT_EXCHANGE.into(),
            host: None,
            interval_s: 10,
            labels: BTreeMap::new(),
            apps: BTreeMap::new(),
            agent_config: "/etc/convoy/agent.toml".into(),
            bus: BusTuning::default(),
        }
    }
}

impl Config {
    fn host(&self) -> anyhow::Result<HostName> {
        let raw = convoy_daemon::host_name(self.host.as_deref())?;
        HostName::new(raw).map_err(|e| anyhow::anyhow!("config key `host`: {e}"))
    }

    fn validate(&self) -> anyhow::Result<()> {
        self.host()?;
        if self.interval_s == 0 {
            anyhow::bail!("config key `interval_s` must be at least 1");
        }
        for name in self.apps.keys() {
            Name::new(name.as_str())
                .map_err(|e| anyhow::anyhow!("config key `apps.{name}`: {e}"))?;
        }
        Ok(())
    }

    /// App roots: configured here, or the `root` of each `[apps.*]` in the agent's config.
    fn app_roots(&self) -> BTreeMap<Name, AppRoot> {
        let from_here = self
            .apps
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<Vec<_>>();
        let pairs = if from_here.is_empty() {
            agent_roots(&self.agent_config)
        } else {
            from_here
        };
        pairs
            .into_iter()
            .filter_map(|(name, root)| Some((Name::new(name).ok()?, AppRoot::new(root))))
            .collect()
    }
}

fn agent_roots(path: &Path) -> Vec<(String, PathBuf)> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let Ok(value) = text.parse::<toml::Table>() else {
        tracing::warn!(path = %path.display(), "cannot parse the agent's config for app roots");
        return Vec::new();
    };
    let Some(apps) = value.get("apps").and_then(|a| a.as_table()) else {
        return Vec::new();
    };
    apps.iter()
        .filter_map(|(name, app)| {
            let root = app.get("root")?.as_str()?;
            Some((name.clone(), PathBuf::from(root)))
        })
        .collect()
}

fn load_average() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut parts = text
        .split_whitespace()
        .map(|p| p.parse::<f64>().unwrap_or(0.0));
    [
        parts.next().unwrap_or(0.0),
        parts.next().unwrap_or(0.0),
        parts.next().unwrap_or(0.0),
    ]
}

fn free_bytes(path: &Path) -> u64 {
    nix::sys::statvfs::statvfs(path)
        .map(|s| s.blocks_available().saturating_mul(s.fragment_size()))
        .unwrap_or(0)
}

fn beat(config: &Config, host: &HostName, started: chrono::DateTime<Utc>) -> Message {
    let roots = config.app_roots();
    let disk_path = roots
        .values()
        .next()
        .map(|r| r.path().to_owned())
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("/"));
    let body = Heartbeat {
        host: host.clone(),
        labels: config.labels.clone(),
        versions: [(
            "convoy-heartbeat".to_owned(),
            env!("CARGO_PKG_VERSION").to_owned(),
        )]
        .into(),
        apps: roots
            .iter()
            .map(|(name, root)| (name.clone(), root.state()))
            .collect(),
        load: load_average(),
        disk_free_bytes: free_bytes(&disk_path),
        interval_s: config.interval_s,
        started_at: started,
    };
    Message::new(format!("heartbeat@{host}"), Body::Heartbeat(body))
}

/// Publishes heartbeats.
#[derive(Parser)]
#[command(name = "convoy-heartbeat", version)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
    /// Print one heartbeat as JSON and exit, without the bus.
    #[arg(long)]
    print: bool,
}

fn main() -> ExitCode {
    logging::init("heartbeat");
    let cli = Cli::parse();
    let config: Config = match convoy_daemon::load_valid(
        "convoy-heartbeat",
        "heartbeat",
        &cli.config,
        Config::validate,
    ) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if cli.print {
        let host = match config.host() {
            Ok(h) => h,
            Err(e) => {
                eprintln!("convoy-heartbeat: {e}");
                return ExitCode::from(convoy_daemon::EXIT_CONFIG);
            }
        };
        match beat(&config, &host, Utc::now()).encode() {
            Ok(bytes) => println!("{}", String::from_utf8_lossy(&bytes)),
            Err(e) => eprintln!("convoy-heartbeat: {e}"),
        }
        return ExitCode::SUCCESS;
    }
    convoy_daemon::block_on("convoy-heartbeat", run(cli, config))
}

async fn run(cli: Cli, mut config: Config) -> anyhow::Result<()> {
    let life = Lifecycle::start()?;
    let host = config.host()?;
    let bus_config = BusConfig::from_settings(&config.amqp_url, &config.exchange, &config.bus);
    let bus = Bus::new(bus_config, format!("convoy-heartbeat@{host}"))?;
    let publisher = Publisher::new(bus.clone());
    let started = Utc::now();
    let mut reloads = life.reloads();
    life.ready(&format!("heartbeat every {} s", config.interval_s));
    tracing::info!(%host, interval_s = config.interval_s, "heartbeat ready");
    let mut tick = tokio::time::interval(Duration::from_secs(u64::from(config.interval_s)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = life.stopping() => break,
            Ok(()) = reloads.changed() => {
                match convoy_daemon::load::<Config>("heartbeat", &cli.config).and_then(|c| c.validate().map(|()| c).map_err(|e| convoy_daemon::ConfigError::Invalid(e.to_string()))) {
                    Ok(c) => {
                        if c.interval_s != config.interval_s {
                            tick = tokio::time::interval(Duration::from_secs(u64::from(c.interval_s)));
                        }
                        config = c;
                        life.reloaded("configuration reloaded");
                        tracing::info!("configuration reloaded");
                    }
                    Err(e) => {
                        tracing::error!("reload refused, keeping the old configuration: {e}");
                        life.reloaded("reload refused, old configuration kept (see the log)");
                    }
                }
                continue;
            }
        }
        let message = beat(&config, &host, started);
        let out = match Outgoing::message(&message) {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a heartbeat");
                continue;
            }
        };
        // A heartbeat is only worth its interval: never queue them up. One nobody is bound
        // to receive (no conductor yet) is dropped at once, not retried.
        let deadline =
            tokio::time::Instant::now() + Duration::from_secs(u64::from(config.interval_s));
        let mut backoff = convoy_bus::backoff::Backoff::new(Duration::from_secs(5));
        loop {
            match publisher.publish_once(&out).await {
                Ok(()) => tracing::debug!("heartbeat sent"),
                Err(PublishError::Unroutable { .. }) => {
                    tracing::debug!("no conductor queue bound yet; heartbeat dropped")
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    if tokio::time::Instant::now() + delay < deadline {
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => continue,
                            _ = life.stopping() => {}
                        }
                    }
                    tracing::warn!(error = %e, "heartbeat not sent");
                }
            }
            break;
        }
    }
    bus.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packaged_example_config_is_valid() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../packaging/etc/convoy/heartbeat.toml"
        );
        let args = ConfigArgs {
            config: Some(path.into()),
            set: vec!["host=web1".into()],
        };
        let config: Config =
            convoy_daemon::settings::load_from("heartbeat", &args, Vec::new()).unwrap();
        config.validate().unwrap();
        assert_eq!(config.labels["stage"], "prod");
    }
}
