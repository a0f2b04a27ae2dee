//! The agent's configuration: `/etc/convoy/agent.toml`, layered (see convoy-daemon).

use convoy_bus::{BusConfig, BusTuning, DEFAULT_AMQP_URL, DEFAULT_EXCHANGE};
use convoy_message::TrustSet;
use convoy_message::names::{HostName, Name};
use convoy_message::signing::{KeyError, MAX_COMMAND_VALIDITY};
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

    /// The fewest days the journal must remember a command for its replay to be
    /// recognised: a command may be valid for [`MAX_COMMAND_VALIDITY`], and is accepted
    /// `max_clock_skew_s` early and late.
    pub fn min_journal_days(&self) -> u32 {
        let validity = MAX_COMMAND_VALIDITY.num_seconds().unsigned_abs();
        let secs = validity + 2 * u64::from(self.max_clock_skew_s);
        u32::try_from(secs.div_ceil(86_400)).unwrap_or(u32::MAX)
    }

    /// Checks what serde cannot: app names, roots, shared paths, health checks, and a
    /// journal that remembers commands as long as they can be replayed.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.host_name()?;
        let min_days = self.min_journal_days();
        if self.journal_days < min_days {
            anyhow::bail!(
                "config key `journal_days` = {} is below the minimum of {min_days}: a command may be valid for up to {} days, accepted `max_clock_skew_s` ({} s) early or late, and a command the journal has forgotten could run again; set journal_days = {min_days} or more",
                self.journal_days,
                MAX_COMMAND_VALIDITY.num_days(),
                self.max_clock_skew_s
            );
        }
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

    /// Reads every `*.pub` in `trusted_keys_dir`. An error names the directory or the file
    /// and says what to do: the agent does not start on it (exit 78), a reload is refused.
    pub fn trusted_keys(&self) -> anyhow::Result<TrustSet> {
        TrustSet::load_dir(&self.trusted_keys_dir).map_err(|e| {
            let fix = match &e {
                KeyError::ReadDir { .. } => {
                    "create it, readable by root, and copy the conductor's public key (the `.pub` file `convoy keygen` wrote) into it"
                }
                KeyError::Read { .. } => "make it readable by root, or remove it",
                KeyError::DuplicateKeyId { .. } => {
                    "keep the file of the key the conductor signs with and remove the other (a new key needs an id of its own: `convoy keygen --id …`)"
                }
                _ => {
                    "replace it with the conductor's `.pub` file, or move it out of the directory (every *.pub there is trusted)"
                }
            };
            anyhow::anyhow!(
                "config key `trusted_keys_dir` ({}): {e}; {fix}",
                self.trusted_keys_dir.display()
            )
        })
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

    #[test]
    fn a_journal_shorter_than_a_command_can_live_is_refused() {
        let mut config = AgentConfig {
            host: Some("web1".into()),
            ..AgentConfig::default()
        };
        assert_eq!(
            config.min_journal_days(),
            8,
            "7 days and twice 120 s of skew"
        );
        config.validate().unwrap();
        config.journal_days = 7;
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.contains("journal_days") && err.contains("minimum of 8"),
            "{err}"
        );
        config.journal_days = 8;
        config.validate().unwrap();
        config.max_clock_skew_s = 0;
        config.journal_days = 7;
        config.validate().unwrap();
    }

    #[test]
    fn bad_trusted_keys_are_named_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = AgentConfig {
            trusted_keys_dir: dir.path().join("missing"),
            ..AgentConfig::default()
        };
        let err = config.trusted_keys().unwrap_err().to_string();
        assert!(
            err.contains("trusted_keys_dir") && err.contains("missing"),
            "{err}"
        );
        assert!(err.contains("create it"), "{err}");

        config.trusted_keys_dir = dir.path().to_owned();
        std::fs::write(dir.path().join("typo.pub"), "ssh-ed25519 AAAA me@laptop\n").unwrap();
        let err = config.trusted_keys().unwrap_err().to_string();
        assert!(
            err.contains("typo.pub") && err.contains("replace it"),
            "{err}"
        );
        std::fs::remove_file(dir.path().join("typo.pub")).unwrap();

        let bad_id = "convoy-ed25519-public ../x AAAA\n";
        std::fs::write(dir.path().join("bad-id.pub"), bad_id).unwrap();
        let err = config.trusted_keys().unwrap_err().to_string();
        assert!(err.contains("bad-id.pub"), "{err}");
        std::fs::remove_file(dir.path().join("bad-id.pub")).unwrap();

        let a = convoy_message::KeyPair::generate("conductor").unwrap();
        let b = convoy_message::KeyPair::generate("conductor").unwrap();
        std::fs::write(dir.path().join("conductor.pub"), a.public_line()).unwrap();
        std::fs::write(dir.path().join("conductor-new.pub"), b.public_line()).unwrap();
        let err = config.trusted_keys().unwrap_err().to_string();
        assert!(
            err.contains("conductor.pub") && err.contains("conductor-new.pub"),
            "{err}"
        );
        std::fs::remove_file(dir.path().join("conductor-new.pub")).unwrap();
        assert_eq!(config.trusted_keys().unwrap().len(), 1);
    }
}
