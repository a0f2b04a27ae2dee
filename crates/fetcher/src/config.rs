//! `/etc/convoy/fetcher.toml`.

use convoy_bus::{BusConfig, BusTuning, DEFAULT_AMQP_URL, DEFAULT_EXCHANGE};
use convoy_message::names::{HostName, Name};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub amqp_url: String,
    pub exchange: String,
    /// This host's name (default: the system host name).
    pub host: Option<String>,
    /// Where the bare mirrors live: `<mirror_dir>/<repo>.git` (the agent exports from them).
    pub mirror_dir: PathBuf,
    /// Push events arriving within this window are served by one fetch.
    pub debounce_ms: u64,
    /// A fetch taking longer is abandoned and reported as failed.
    pub fetch_timeout_s: u64,
    pub repos: BTreeMap<String, RepoConfig>,
    pub bus: BusTuning,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            amqp_url: DEFAULT_AMQP_URL.into(),
            exchange: DEFAULT_EXCHANGE.into(),
            host: None,
            mirror_dir: "/var/lib/convoy/mirrors".into(),
            debounce_ms: 300,
            fetch_timeout_s: 300,
            repos: BTreeMap::new(),
            bus: BusTuning::default(),
        }
    }
}

pub use convoy_git::RepoConfig;

impl Config {
    pub fn bus_config(&self) -> BusConfig {
        BusConfig::from_settings(&self.amqp_url, &self.exchange, &self.bus)
    }

    pub fn host_name(&self) -> anyhow::Result<HostName> {
        let raw = convoy_daemon::host_name(self.host.as_deref())?;
        HostName::new(raw).map_err(|e| anyhow::anyhow!("config key `host`: {e}"))
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        self.host_name()?;
        for (name, repo) in &self.repos {
            Name::new(name.as_str())
                .map_err(|e| anyhow::anyhow!("config key `repos.{name}`: {e}"))?;
            if repo.url.is_empty() {
                anyhow::bail!("config key `repos.{name}.url` is required");
            }
            let https = repo.url.starts_with("https://");
            if repo.token_file.is_some() && !https {
                anyhow::bail!(
                    "config key `repos.{name}.token_file` needs an https:// URL (the token would travel unencrypted or unused)"
                );
            }
            if repo.tls_ca_file.is_some() && !https {
                anyhow::bail!(
                    "config key `repos.{name}.tls_ca_file` applies to https:// URLs only"
                );
            }
            if repo.url.starts_with("ssh://") && repo.known_hosts.is_none() {
                anyhow::bail!(
                    "config key `repos.{name}.known_hosts` is required for ssh:// URLs (host keys are checked)"
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packaged_example_config_is_valid() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../packaging/etc/convoy/fetcher.toml"
        );
        let args = convoy_daemon::ConfigArgs {
            config: Some(path.into()),
            set: vec!["host=web1".into()],
        };
        let config: Config =
            convoy_daemon::settings::load_from("fetcher", &args, Vec::new()).unwrap();
        config.validate().unwrap();
        assert!(config.repos["shop"].known_hosts.is_some());
    }

    #[test]
    fn ssh_without_known_hosts_is_refused() {
        let mut config = Config {
            host: Some("web1".into()),
            ..Config::default()
        };
        config.repos.insert(
            "shop".into(),
            RepoConfig {
                url: "ssh://git@git.example.com/shop.git".into(),
                ..RepoConfig::default()
            },
        );
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("repos.shop.known_hosts")
        );
    }

    #[test]
    fn a_token_or_a_ca_file_needs_an_https_url() {
        for (url, key) in [
            ("http://git.example.com/shop.git", "token_file"),
            ("ssh://git@git.example.com/shop.git", "token_file"),
            ("/srv/git/shop.git", "tls_ca_file"),
        ] {
            let mut config = Config {
                host: Some("web1".into()),
                ..Config::default()
            };
            let mut repo = RepoConfig {
                url: url.into(),
                known_hosts: Some("/etc/convoy/known_hosts".into()),
                ..RepoConfig::default()
            };
            if key == "token_file" {
                repo.token_file = Some("/etc/convoy/keys/shop.token".into());
            } else {
                repo.tls_ca_file = Some("/etc/convoy/ca.pem".into());
            }
            config.repos.insert("shop".into(), repo.clone());
            let error = config.validate().unwrap_err().to_string();
            assert!(
                error.contains(&format!("repos.shop.{key}")),
                "{url}: {error}"
            );
            repo.url = "https://git.example.com/shop.git".into();
            config.repos.insert("shop".into(), repo);
            config.validate().unwrap();
        }
    }
}
