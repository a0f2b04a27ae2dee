//! `/etc/convoy/conductor.toml`: apps and their stages, the signing key, API users and tokens.

use crate::plan::{BatchPlan, Budget};
use anyhow::{Context, bail};
use convoy_bus::{BusConfig, BusTuning, DEFAULT_AMQP_URL, DEFAULT_EXCHANGE};
use convoy_message::names::{HostName, Name, RefName};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub amqp_url: String,
    pub exchange: String,
    /// Where the SQLite store (`conductor.db`) and gate outputs live.
    pub state_dir: PathBuf,
    /// The ed25519 private key file commands are signed with (`convoy keygen` writes one).
    pub signing_key: PathBuf,
    /// Address of the HTTP API, dashboard and metrics.
    pub listen: String,
    /// A host is `stale` after this many missed heartbeat intervals, `gone` after `gone_after`.
    pub stale_after: u32,
    pub gone_after: u32,
    pub apps: BTreeMap<String, AppConfig>,
    /// API tokens (the CLI's `CONVOY_TOKEN`).
    pub tokens: Vec<TokenConfig>,
    /// Web users (the dashboard's login).
    pub users: Vec<UserConfig>,
    /// The dashboard's sessions.
    pub web: WebConfig,
    pub bus: BusTuning,
}

/// `[web]`: how the dashboard's login sessions behave.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebConfig {
    /// Hours a login lasts without being used.
    pub session_idle_h: u64,
    /// Mark the session cookie `Secure` (set when the dashboard is served over HTTPS, e.g.
    /// behind a TLS-terminating proxy).
    pub secure_cookies: bool,
}

impl Default for WebConfig {
    fn default() -> Self {
        Self {
            session_idle_h: 12,
            secure_cookies: false,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            amqp_url: DEFAULT_AMQP_URL.into(),
            exchange: DEFAULT_EXCHANGE.into(),
            state_dir: "/var/lib/convoy/conductor".into(),
            signing_key: "/etc/convoy/keys/conductor.key".into(),
            listen: "127.0.0.1:8470".into(),
            stale_after: 3,
            gone_after: 30,
            apps: BTreeMap::new(),
            tokens: Vec::new(),
            users: Vec::new(),
            web: WebConfig::default(),
            bus: BusTuning::default(),
        }
    }
}

/// What may be done with a token or a login.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Sees everything, changes nothing.
    Viewer,
    /// Deploys, promotes, aborts, retries and rolls back.
    Deployer,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who the token acts as; recorded with every action.
    pub name: String,
    /// The SHA-256 of the token, hex (`convoy token` prints both). Preferred to `token`.
    #[serde(default)]
    pub sha256: Option<String>,
    /// The token in clear text, for demos and tests.
    #[serde(default)]
    pub token: Option<String>,
    pub role: Role,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// An argon2 PHC string (`convoy passwd` prints one).
    pub password_hash: String,
    pub role: Role,
}

/// One application: its repository, ordered stages and pipeline behaviour.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    /// The repository name as fetchers and hooks know it (default: the app's name).
    #[serde(default)]
    pub repo: Option<String>,
    /// In order: a pipeline deploys to the first, then each gate decides the next.
    pub stages: Vec<StageConfig>,
    #[serde(default)]
    pub pipeline: PipelineConfig,
    /// When a rollout is requested while another runs on the same stage.
    #[serde(default)]
    pub concurrency: Concurrency,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Concurrency {
    /// The new rollout waits until the running one ends.
    #[default]
    Queue,
    /// The running rollout is stopped (hosts in flight finish) and the new one starts.
    Supersede,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineConfig {
    /// A `build succeeded` event deploys its commit to the first stage.
    pub auto_deploy: bool,
    /// Which built refs start a pipeline (glob, `*` within a component, `**` across);
    /// default: every branch and tag.
    pub refs: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    pub name: String,
    /// Hosts by name.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Hosts whose heartbeat labels include all of these.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub strategy: StrategyConfig,
    /// What decides whether the pipeline goes on to the next stage.
    #[serde(default)]
    pub gate: GateConfig,
}

/// How a rollout spreads over a stage's hosts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StrategyConfig {
    /// Batch sizes: counts or percentages of the stage's hosts; the last repeats.
    pub batches: BatchPlan,
    /// Failed hosts allowed over the whole rollout: a count or a percentage.
    pub max_failures: Budget,
    /// Seconds a host has to answer a command before it fails.
    pub host_deadline_s: u64,
    /// Seconds to wait between batches.
    pub pause_s: u64,
    pub on_failure: OnFailure,
}

impl Default for StrategyConfig {
    fn default() -> Self {
        Self {
            batches: BatchPlan::default(),
            max_failures: Budget::Count(0),
            host_deadline_s: 600,
            pause_s: 0,
            on_failure: OnFailure::Halt,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Stop; hosts already done stay on the new release.
    #[default]
    Halt,
    /// Stop and put the hosts already done back on their previous release.
    Rollback,
}

/// The gate after a stage.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", deny_unknown_fields)]
pub enum GateConfig {
    /// Go on at once.
    #[default]
    Auto,
    /// An operator presses Promote.
    Manual,
    /// An integration-test command run against the stage: exit 0 passes.
    Tests {
        /// argv, run without a shell; `CONVOY_*` variables describe the stage.
        command: Vec<String>,
        #[serde(default = "default_tests_timeout")]
        timeout_s: u64,
    },
}

/// Commands are valid for the host deadline; agents accept at most a week.
pub const MAX_HOST_DEADLINE_S: u64 = 7 * 24 * 3600;

/// The longest pause between batches: a week (a longer one is a typo, and would stall the
/// rollout for good; `convoy pause` holds a rollout as long as wanted).
pub const MAX_PAUSE_S: u64 = 7 * 24 * 3600;

fn default_tests_timeout() -> u64 {
    1800
}

impl GateConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            GateConfig::Auto => "auto",
            GateConfig::Manual => "manual",
            GateConfig::Tests { .. } => "tests",
        }
    }
}

impl AppConfig {
    pub fn repo(&self, app: &str) -> String {
        self.repo.clone().unwrap_or_else(|| app.to_owned())
    }

    pub fn stage(&self, name: &str) -> Option<(usize, &StageConfig)> {
        self.stages.iter().enumerate().find(|(_, s)| s.name == name)
    }
}

impl PipelineConfig {
    /// Whether a build of `git_ref` starts a pipeline.
    pub fn wants(&self, git_ref: &RefName) -> bool {
        self.auto_deploy
            && (self.refs.is_empty()
                || self
                    .refs
                    .iter()
                    .any(|p| glob_match(p, git_ref.as_str()) || glob_match(p, git_ref.short())))
    }
}

/// `*` matches within a path component, `**` across components.
pub fn glob_match(pattern: &str, text: &str) -> bool {
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

impl Config {
    pub fn bus_config(&self) -> BusConfig {
        BusConfig::from_settings(&self.amqp_url, &self.exchange, &self.bus)
    }

    pub fn db_path(&self) -> PathBuf {
        self.state_dir.join("conductor.db")
    }

    /// Checks what serde cannot, naming the key at fault.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            bail!(
                "listen: {:?} is not an address like 127.0.0.1:8470",
                self.listen
            );
        }
        if self.stale_after == 0 || self.gone_after <= self.stale_after {
            bail!("stale_after must be at least 1 and gone_after larger than stale_after");
        }
        for (name, app) in &self.apps {
            Name::new(name.as_str())
                .with_context(|| format!("apps.{name}: not a valid app name"))?;
            Name::new(app.repo(name)).with_context(|| format!("apps.{name}.repo"))?;
            if app.stages.is_empty() {
                bail!("apps.{name}.stages: an app needs at least one stage");
            }
            let mut seen = BTreeSet::new();
            for (i, stage) in app.stages.iter().enumerate() {
                let key = format!("apps.{name}.stages[{i}]");
                Name::new(stage.name.as_str())
                    .with_context(|| format!("{key}.name: not a valid stage name"))?;
                if !seen.insert(stage.name.as_str()) {
                    bail!("{key}.name: stage {:?} appears twice", stage.name);
                }
                if stage.hosts.is_empty() && stage.labels.is_empty() {
                    bail!("{key}: give `hosts` or `labels` (or both) to say which hosts it has");
                }
                for h in &stage.hosts {
                    HostName::new(h.as_str())
                        .with_context(|| format!("{key}.hosts: {h:?} is not a valid host name"))?;
                }
                stage
                    .strategy
                    .batches
                    .check()
                    .map_err(|e| anyhow::anyhow!("{key}.strategy.batches: {e}"))?;
                stage
                    .strategy
                    .max_failures
                    .check()
                    .map_err(|e| anyhow::anyhow!("{key}.strategy.max_failures: {e}"))?;
                if !(1..=MAX_HOST_DEADLINE_S).contains(&stage.strategy.host_deadline_s) {
                    bail!(
                        "{key}.strategy.host_deadline_s must be between 1 and {MAX_HOST_DEADLINE_S}"
                    );
                }
                if stage.strategy.pause_s > MAX_PAUSE_S {
                    bail!("{key}.strategy.pause_s must be at most {MAX_PAUSE_S} (a week)");
                }
                if let GateConfig::Tests { command, .. } = &stage.gate
                    && command.is_empty()
                {
                    bail!("{key}.gate.command: a tests gate needs a command (argv list)");
                }
            }
        }
        for (i, t) in self.tokens.iter().enumerate() {
            match (&t.sha256, &t.token) {
                (Some(h), None) if h.len() == 64 && hex::decode(h).is_ok() => {}
                (Some(_), None) => bail!("tokens[{i}].sha256: must be 64 hex digits"),
                (None, Some(tok)) if tok.len() >= 16 => {}
                (None, Some(_)) => bail!("tokens[{i}].token: must be at least 16 characters"),
                _ => bail!("tokens[{i}]: give exactly one of `sha256` or `token`"),
            }
        }
        for (i, u) in self.users.iter().enumerate() {
            if argon2::PasswordHash::new(&u.password_hash).is_err()
                || !u.password_hash.starts_with("$argon2")
            {
                bail!(
                    "users[{i}].password_hash: must be an argon2 PHC string ($argon2id$…); `convoy passwd` prints one"
                );
            }
            if u.name.is_empty() || u.name.len() > 64 || u.name.chars().any(char::is_control) {
                bail!("users[{i}].name: 1 to 64 printable characters");
            }
            if self.users[..i].iter().any(|o| o.name == u.name) {
                bail!("users[{i}].name: {:?} is listed twice", u.name);
            }
        }
        if !(1..=720).contains(&self.web.session_idle_h) {
            bail!("web.session_idle_h must be between 1 and 720");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("refs/tags/*", "refs/tags/v1"));
        assert!(!glob_match("refs/tags/*", "refs/tags/a/b"));
        assert!(glob_match("refs/**", "refs/tags/a/b"));
        assert!(glob_match("v*", "v1.2"));
        assert!(!glob_match("v*", "main"));
    }

    #[test]
    fn packaged_example_config_is_valid() {
        let text = include_str!("../../../packaging/etc/convoy/conductor.toml");
        let config: Config = toml::from_str(text).expect("the example parses");
        config.validate().expect("the example is valid");
        assert!(!config.apps.is_empty());
    }
}
