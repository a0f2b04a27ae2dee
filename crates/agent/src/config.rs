//! The agent's configuration: `/etc/convoy/agent.toml`, layered (see convoy-daemon).

use convoy_bus::{BusConfig, BusTuning, DEFAULT_AMQP_URL, DEFAULT_EXCHANGE};
use convoy_message::names::{HostName, Name};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Everything the agent reads from its config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    pub amqp_url: String,
    pub exchange: String,
    /// This host's name as commands address it (default: the system host name).
    pub host: Option<String>,
    /// The journal of received commands and their results.
    pub state_dir: PathBuf,
    /// Bare mirrors kept by convoy-fetcher: `<mirror_dir>/<repo>.git`.
    pub mirror_dir: PathBuf,
    /// Public keys (`*.pub`) whose signatures this host obeys.
    pub trusted_keys_dir: PathBuf,
    /// How far a signer's clock may differ from ours, in seconds.
    pub max_clock_skew_s: u32,
    /// Complete releases kept per app (current and previous are always kept).
    pub keep_releases: usize,
    /// Days a command's journal entry is kept (replays within it are recognised).
    pub journal_days: u32,
    pub apps: BTreeMap<String, AppConfig>,
    pub bus: BusTuning,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            amqp_url: DEFAULT_AMQP_URL.to_owned(),
            exchange: DEFAULT_EXCHANGE.to_owned(),
            host: None,
            state_dir: "/var/lib/convoy/agent".into(),
            mirror_dir: "/var/lib/convoy/mirrors".into(),
            trusted_keys_dir: "/etc/convoy/trusted-keys".into(),
            max_clock_skew_s: 120,
            keep_releases: 5,
            journal_days: 14,
            apps: BTreeMap::new(),
            bus: BusTuning::default(),
        }
    }
}

/// One app on this host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AppConfig {
    /// ROOT: holds releases/, current, previous, shared/.
    pub root: PathBuf,
    /// The mirrored repository (default: the app's name).
    pub repo: Option<String>,
    /// Run hooks as this user (the agent must run as root to switch users).
    pub user: Option<String>,
    /// Paths linked from ROOT/shared into every release (`dir/` for directories).
    pub shared: Vec<String>,
    /// Extra environment for the hooks.
    pub env: BTreeMap<String, String>,
    pub hooks: Hooks,
    pub health: Option<HealthCheck>,
    /// Seconds each hook may run before its process group is killed.
    pub timeouts: Timeouts,
}

impl Default for AppConfig {
    fn default() -> Self {
        Self {
            root: PathBuf::new(),
            repo: None,
            user: None,
            shared: Vec::new(),
            env: BTreeMap::new(),
            hooks: Hooks::default(),
            health: None,
            timeouts: Timeouts::default(),
        }
    }
}

/// A hook: an argument vector run directly, or a string run by `/bin/sh -c`. Either way it
/// comes from this trusted file; message fields reach hooks only as `CONVOY_*` variables.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum HookCommand {
    Shell(String),
    Argv(Vec<String>),
}

impl HookCommand {
    /// The program and its arguments.
    pub fn argv(&self) -> Vec<String> {
        match self {
            HookCommand::Shell(s) => vec!["/bin/sh".into(), "-c".into(), s.clone()],
            HookCommand::Argv(v) => v.clone(),
        }
    }
}

/// The hooks of a deploy, in the order they run around the switch.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Hooks {
    pub build: Option<HookCommand>,
    pub pre_switch: Option<HookCommand>,
    pub restart: Option<HookCommand>,
    pub post_switch: Option<HookCommand>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    pub build_s: u64,
    pub pre_switch_s: u64,
    pub restart_s: u64,
    pub post_switch_s: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            build_s: 900,
            pre_switch_s: 120,
            restart_s: 120,
            post_switch_s: 120,
        }
    }
}

/// Health of the new release: an HTTP URL answering 2xx, or a command exiting 0; retried
/// every `interval_ms` until `deadline_s`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthCheck {
    pub url: Option<String>,
    pub command: Option<HookCommand>,
    pub interval_ms: u64,
    pub deadline_s: u64,
    /// Seconds one try may take.
    pub try_timeout_s: u64,
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            url: None,
            command: None,
            interval_ms: 500,
            deadline_s: 30,
            try_timeout_s: 5,
        }
    }
}

impl AgentConfig {
    pub fn bus_config(&self) -> BusConfig {
        BusConfig::from_settings(&self.amqp_url, &self.exchange, &self.bus)
    }

    /// This host's validated name.
    pub fn host_name(&self) -> anyhow::Result<HostName> {
        let raw = convoy_daemon::host_name(self.host.as_deref())?;
        HostName::new(raw).map_err(|e| anyhow::anyhow!("config key `host`: {e}"))
    }

    /// Checks what serde cannot: app names, roots, shared paths, health checks.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.host_name()?;
        for (name, app) in &self.apps {
            Name::new(name.as_str())
                .map_err(|e| anyhow::anyhow!("config key `apps.{name}`: {e}"))?;
            if !app.root.is_absolute() {
                anyhow::bail!("config key `apps.{name}.root` must be an absolute path");
            }
            if let Some(repo) = &app.repo {
                Name::new(repo.as_str())
                    .map_err(|e| anyhow::anyhow!("config key `apps.{name}.repo`: {e}"))?;
            }
            for shared in &app.shared {
                convoy_release::check_shared_path(shared)
                    .map_err(|e| anyhow::anyhow!("config key `apps.{name}.shared`: {e}"))?;
            }
            if let Some(h) = &app.health
                && h.url.is_none() == h.command.is_none()
            {
                anyhow::bail!(
                    "config key `apps.{name}.health`: set exactly one of `url` or `command`"
                );
            }
            for key in app.env.keys() {
                if key.starts_with("CONVOY_") {
                    anyhow::bail!(
                        "config key `apps.{name}.env.{key}`: CONVOY_* variables are set by the agent"
                    );
                }
            }
        }
        Ok(())
    }

    /// The app's repository name.
    pub fn repo_of(&self, app: &str) -> Option<String> {
        self.apps
            .get(app)
            .map(|a| a.repo.clone().unwrap_or_else(|| app.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packaged_example_config_is_valid() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../packaging/etc/convoy/agent.toml"
        );
        let args = convoy_daemon::ConfigArgs {
            config: Some(path.into()),
            set: vec!["host=web1".into()],
        };
        let config: AgentConfig =
            convoy_daemon::settings::load_from("agent", &args, Vec::new()).unwrap();
        config.validate().unwrap();
        let shop = &config.apps["shop"];
        assert_eq!(shop.hooks.pre_switch.as_ref().unwrap().argv()[0], "bundle");
        assert_eq!(shop.hooks.build.as_ref().unwrap().argv()[0], "/bin/sh");
        assert!(shop.health.as_ref().unwrap().url.is_some());
    }

    #[test]
    fn bad_apps_are_named() {
        let mut config = AgentConfig {
            host: Some("web1".into()),
            ..AgentConfig::default()
        };
        config.apps.insert(
            "shop".into(),
            AppConfig {
                root: "relative/path".into(),
                ..AppConfig::default()
            },
        );
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("apps.shop.root"), "{err}");
    }
}
