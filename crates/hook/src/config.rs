//! `/etc/convoy/hook.toml`.

use convoy_bus::{BusConfig, BusTuning, DEFAULT_AMQP_URL, DEFAULT_EXCHANGE};
use convoy_message::names::Name;
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

    /// Checks what serde cannot, naming the key at fault: what every use of the file needs.
    pub fn validate(&self) -> anyhow::Result<()> {
        if let Some(repo) = &self.repo {
            Name::new(repo.as_str()).map_err(|e| anyhow::anyhow!("config key `repo`: {e}"))?;
        }
        for (forge_name, name) in &self.serve.repo_names {
            Name::new(name.as_str()).map_err(|e| {
                anyhow::anyhow!("config key `serve.repo_names.{forge_name:?}`: {e}")
            })?;
        }
        Ok(())
    }

    /// [`Config::validate`] and what `serve` needs besides: an address to listen on and at
    /// least one forge, each with a secret long enough not to be guessed.
    pub fn validate_serve(&self) -> anyhow::Result<()> {
        self.validate()?;
        let serve = &self.serve;
        if serve.listen.parse::<std::net::SocketAddr>().is_err() {
            anyhow::bail!(
                "config key `serve.listen`: {:?} is not an address like 127.0.0.1:8091",
                serve.listen
            );
        }
        let secrets = [
            ("serve.github_secret", &serve.github_secret),
            ("serve.gitlab_token", &serve.gitlab_token),
            ("serve.gitea_secret", &serve.gitea_secret),
        ];
        for (key, secret) in secrets {
            if secret.as_ref().is_some_and(|s| s.len() < 16) {
                anyhow::bail!(
                    "config key `{key}` is shorter than 16 characters: use a long random secret"
                );
            }
        }
        if secrets.iter().all(|(_, s)| s.is_none()) {
            anyhow::bail!(
                "no forge is enabled: set serve.github_secret, serve.gitlab_token or serve.gitea_secret"
            );
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
            "/../../packaging/etc/convoy/hook.toml"
        );
        let args = convoy_daemon::ConfigArgs {
            config: Some(path.into()),
            set: vec![],
        };
        let config: Config = convoy_daemon::settings::load_from("hook", &args, Vec::new()).unwrap();
        assert_eq!(config.budget_ms, 2000);
        assert_eq!(config.serve.listen, "127.0.0.1:8091");
        config.validate().unwrap();
    }

    #[test]
    fn serve_needs_an_address_and_a_forge_with_a_long_secret() {
        let mut config = Config::default();
        let err = |c: &Config| format!("{:#}", c.validate_serve().unwrap_err());
        assert!(err(&config).contains("no forge is enabled"));
        config.serve.github_secret = Some("short".into());
        assert!(err(&config).contains("`serve.github_secret` is shorter than 16"));
        config.serve.github_secret = Some("a-long-enough-secret".into());
        config.validate_serve().unwrap();
        config.serve.listen = "localhost".into();
        assert!(err(&config).contains("`serve.listen`"));
    }

    #[test]
    fn names_are_checked_where_they_are_configured() {
        let config = Config {
            repo: Some("../shop".into()),
            ..Config::default()
        };
        assert!(format!("{:#}", config.validate().unwrap_err()).contains("config key `repo`"));
        let mut config = Config::default();
        config
            .serve
            .repo_names
            .insert("shop.v2".into(), "shop/v2".into());
        let e = format!("{:#}", config.validate().unwrap_err());
        assert!(e.contains("`serve.repo_names.\"shop.v2\"`"), "{e}");
    }
}
