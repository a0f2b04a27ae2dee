//! `/etc/convoy/ci.toml`.

use convoy_bus::{BusConfig, BusTuning, DEFAULT_AMQP_URL, DEFAULT_EXCHANGE};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub amqp_url: String,
    pub exchange: String,
    /// Triggers in flight, so a restart resumes following them.
    pub state_dir: PathBuf,
    pub jenkins: Jenkins,
    /// Which pushes start which job.
    pub jobs: Vec<JobRule>,
    pub notify: Notify,
    pub bus: BusTuning,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            amqp_url: DEFAULT_AMQP_URL.into(),
            exchange: DEFAULT_EXCHANGE.into(),
            state_dir: "/var/lib/convoy/ci".into(),
            jenkins: Jenkins::default(),
            jobs: Vec::new(),
            notify: Notify::default(),
            bus: BusTuning::default(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Jenkins {
    /// e.g. `https://jenkins.example.com`
    pub url: String,
    pub user: String,
    /// The user's API token (or `token_file`).
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    /// Milliseconds between polls of a queue item or a build (at least 100 are used).
    pub poll_interval_ms: u64,
    /// Seconds one HTTP request may take.
    pub request_timeout_s: u64,
    /// Give up following a build after this many hours (it is reported `aborted`).
    pub follow_hours: u64,
}

impl Default for Jenkins {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8080".into(),
            user: "convoy".into(),
            token: None,
            token_file: None,
            poll_interval_ms: 2_000,
            request_timeout_s: 10,
            follow_hours: 12,
        }
    }
}

/// One mapping: pushes of `repo` to refs matching `refs` (and none of `ignore`) start `job`
/// with `parameters`. Values may use `{repo}`, `{ref}`, `{short_ref}` and `{commit}`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobRule {
    pub repo: String,
    /// Glob patterns (`*` matches within a path component, `**` across): default all.
    pub refs: Vec<String>,
    pub ignore: Vec<String>,
    /// The job's path, folders separated by `/` (`team/shop-build`).
    pub job: String,
    pub parameters: BTreeMap<String, String>,
}

/// The plugin-free status endpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Notify {
    /// `POST /notify` listens here (empty: disabled).
    pub listen: String,
    /// Bearer token jobs send (or `token_file`).
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
}

impl Default for Notify {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8092".into(),
            token: None,
            token_file: None,
        }
    }
}

fn secret(
    inline: &Option<String>,
    file: &Option<PathBuf>,
    key: &str,
) -> anyhow::Result<Option<String>> {
    match (inline, file) {
        (Some(t), _) => Ok(Some(t.clone())),
        (None, Some(f)) => std::fs::read_to_string(f)
            .map(|t| Some(t.trim().to_owned()))
            .map_err(|e| anyhow::anyhow!("config key `{key}_file` ({}): {e}", f.display())),
        (None, None) => Ok(None),
    }
}

impl Config {
    pub fn bus_config(&self) -> BusConfig {
        BusConfig::from_settings(&self.amqp_url, &self.exchange, &self.bus)
    }

    pub fn jenkins_token(&self) -> anyhow::Result<Option<String>> {
        secret(
            &self.jenkins.token,
            &self.jenkins.token_file,
            "jenkins.token",
        )
    }

    pub fn notify_token(&self) -> anyhow::Result<Option<String>> {
        secret(&self.notify.token, &self.notify.token_file, "notify.token")
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        for (i, rule) in self.jobs.iter().enumerate() {
            convoy_message::names::Name::new(rule.repo.as_str())
                .map_err(|e| anyhow::anyhow!("config key `jobs[{i}].repo`: {e}"))?;
            if rule.job.is_empty() || rule.job.split('/').any(|p| p.is_empty() || p == "..") {
                anyhow::bail!("config key `jobs[{i}].job` must be a job path like `folder/name`");
            }
        }
        let url = &self.jenkins.url;
        if !(url.starts_with("http://") || url.starts_with("https://")) || url.contains(' ') {
            anyhow::bail!(
                "config key `jenkins.url`: {url:?} is not a URL like https://jenkins.example.com"
            );
        }
        self.jenkins_token()?;
        // The endpoint is on with a token and an address; both must then be usable.
        if let Some(token) = self.notify_token()?
            && !self.notify.listen.is_empty()
        {
            if token.len() < 16 {
                anyhow::bail!(
                    "config key `notify.token` is shorter than 16 characters: use a long random token"
                );
            }
            if self.notify.listen.parse::<std::net::SocketAddr>().is_err() {
                anyhow::bail!(
                    "config key `notify.listen`: {:?} is not an address like 127.0.0.1:8092 (empty disables the endpoint)",
                    self.notify.listen
                );
            }
        }
        Ok(())
    }

    /// The rules a push of `repo` to `git_ref` matches.
    pub fn rules_for<'a>(
        &'a self,
        repo: &str,
        git_ref: &str,
    ) -> impl Iterator<Item = &'a JobRule> + 'a {
        let git_ref = git_ref.to_owned();
        let repo = repo.to_owned();
        self.jobs.iter().filter(move |r| {
            r.repo == repo
                && (r.refs.is_empty() || r.refs.iter().any(|p| glob(p, &git_ref)))
                && !r.ignore.iter().any(|p| glob(p, &git_ref))
        })
    }
}

/// `*` matches any run of characters but `/`; `**` matches anything.
pub fn glob(pattern: &str, text: &str) -> bool {
    fn go(p: &[u8], t: &[u8]) -> bool {
        match p {
            [] => t.is_empty(),
            [b'*', b'*', rest @ ..] => (0..=t.len()).any(|i| go(rest, &t[i..])),
            [b'*', rest @ ..] => (0..=t.len())
                .take_while(|&i| i == 0 || t[i - 1] != b'/')
                .any(|i| go(rest, &t[i..])),
            [c, rest @ ..] => t.first() == Some(c) && go(rest, &t[1..]),
        }
    }
    go(pattern.as_bytes(), text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("refs/heads/main", "refs/heads/main"));
        assert!(glob("refs/tags/*", "refs/tags/v1.2"));
        assert!(!glob("refs/heads/*", "refs/heads/wip/x"));
        assert!(glob("refs/heads/**", "refs/heads/wip/x"));
        assert!(glob("refs/heads/wip/*", "refs/heads/wip/x"));
        assert!(!glob("refs/heads/main", "refs/heads/mainline"));
    }

    #[test]
    fn rules_select_by_repo_ref_and_ignore() {
        let config = Config {
            jobs: vec![JobRule {
                repo: "shop".into(),
                refs: vec!["refs/heads/**".into()],
                ignore: vec!["refs/heads/wip/**".into()],
                job: "shop-build".into(),
                ..JobRule::default()
            }],
            ..Config::default()
        };
        assert_eq!(config.rules_for("shop", "refs/heads/main").count(), 1);
        assert_eq!(config.rules_for("shop", "refs/heads/wip/a").count(), 0);
        assert_eq!(config.rules_for("shop", "refs/tags/v1").count(), 0);
        assert_eq!(config.rules_for("other", "refs/heads/main").count(), 0);
    }
}

#[cfg(test)]
mod example {
    use super::*;

    #[test]
    fn the_packaged_example_config_is_valid() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../packaging/etc/convoy/ci.toml"
        );
        let args = convoy_daemon::ConfigArgs {
            config: Some(path.into()),
            set: vec![],
        };
        let mut config: Config =
            convoy_daemon::settings::load_from("ci", &args, Vec::new()).unwrap();
        config.jenkins.token_file = None; // not on this machine
        config.validate().unwrap();
        assert_eq!(config.rules_for("shop", "refs/tags/v1").count(), 1);
        assert_eq!(config.rules_for("shop", "refs/heads/wip/a").count(), 0);
    }
}
