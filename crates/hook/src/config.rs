//! `/etc/convoy/hook.toml`.

use convoy_bus::{BusConfig, BusTuning, DEFAULT_AMQP_URL, DEFAULT_EXCHANGE};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub amqp_url: String,
    pub exchange: String,
    /// The repo name events carry (default: the repository directory's name without `.git`).
    pub repo: Option<String>,
    /// How long the post-receive hook waits for the broker before spooling, in ms.
    pub budget_ms: u64,
    /// Where unconfirmed events wait for `convoy-hook drain`.
    pub spool_dir: PathBuf,
    /// Commit summaries per event at most.
    pub max_commits: usize,
    /// Seconds between spool drains in `drain --watch` and `serve`.
    pub drain_interval_s: u64,
    pub serve: ServeConfig,
    pub bus: BusTuning,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            amqp_url: DEFAULT_AMQP_URL.into(),
            exchange: DEFAULT_EXCHANGE.into(),
            repo: None,
            budget_ms: 2_000,
            spool_dir: "/var/spool/convoy-hook".into(),
            max_commits: 20,
            drain_interval_s: 10,
            serve: ServeConfig::default(),
            bus: BusTuning::default(),
        }
    }
}

/// The webhook receiver.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    pub listen: String,
    /// GitHub's webhook secret (enables GitHub deliveries).
    pub github_secret: Option<String>,
    /// GitLab's secret token (enables GitLab deliveries).
    pub gitlab_token: Option<String>,
    /// Gitea's webhook secret (enables Gitea deliveries).
    pub gitea_secret: Option<String>,
    /// Larger request bodies are refused with 413.
    pub body_limit_bytes: usize,
    /// Forge repository name → convoy repo name.
    pub repo_names: BTreeMap<String, String>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8091".into(),
            github_secret: None,
            gitlab_token: None,
            gitea_secret: None,
            body_limit_bytes: 1024 * 1024,
            repo_names: BTreeMap::new(),
        }
    }
}

impl Config {
    pub fn bus_config(&self) -> BusConfig {
        BusConfig::from_settings(&self.amqp_url, &self.exchange, &self.bus)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packaged_example_config_is_valid() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../packaging/etc/convoy/hook.toml"
        );
        let args = convoy_daemon::ConfigArgs {
            config: Some(path.into()),
            set: vec![],
        };
        let config: Config = convoy_daemon::settings::load_from("hook", &args, Vec::new()).unwrap();
        assert_eq!(config.budget_ms, 2000);
        assert_eq!(config.serve.listen, "127.0.0.1:8091");
    }
}
