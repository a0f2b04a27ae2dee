//! Layered configuration through the `config` crate.
//!
//! Each daemon describes its settings as a serde struct with `#[serde(default,
//! deny_unknown_fields)]` and a `Default` holding the built-in values. [`load`] layers, from
//! weakest to strongest:
//!
//! 1. the built-in defaults;
//! 2. the TOML file: `--config PATH` (must exist) or `/etc/convoy/<daemon>.toml` (optional);
//! 3. environment variables `CONVOY_<KEY>`, `__` separating nested keys
//!    (`CONVOY_AMQP_URL` → `amqp_url`, `CONVOY_BUS__HEARTBEAT_S` → `bus.heartbeat_s`); only
//!    variables naming one of the daemon's own keys are read, so the variables of other
//!    convoy programs in the same environment are ignored;
//! 4. `--set key=value` flags.

use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The flags every daemon accepts for its configuration.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ConfigArgs {
    /// The config file (default: /etc/convoy/<daemon>.toml, if present).
    #[arg(long, short = 'c', env = "CONVOY_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Override one setting, e.g. `--set bus.heartbeat_s=10` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

/// A configuration that cannot be used, naming the key or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("--set {0:?}: expected KEY=VALUE")]
    BadFlag(String),
    #[error("configuration error: {0}")]
    Invalid(String),
}

/// Where a daemon's config file lives unless `--config` says otherwise.
pub fn default_path(daemon: &str) -> PathBuf {
    Path::new("/etc/convoy").join(format!("{daemon}.toml"))
}

/// Loads `T` for `daemon` (e.g. `agent`) from all layers.
pub fn load<T>(daemon: &str, args: &ConfigArgs) -> Result<T, ConfigError>
where
    T: Serialize + DeserializeOwned + Default,
{
    load_from(daemon, args, std::env::vars())
}

/// [`load`] with the environment given explicitly (tests).
pub fn load_from<T>(
    daemon: &str,
    args: &ConfigArgs,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<T, ConfigError>
where
    T: Serialize + DeserializeOwned + Default,
{
    let defaults = T::default();
    let known = top_level_keys(&defaults);
    let mut builder = config::Config::builder().add_source(
        config::Config::try_from(&defaults).map_err(|e| ConfigError::Invalid(e.to_string()))?,
    );

    let (path, required) = match &args.config {
        Some(p) => (p.clone(), true),
        None => (default_path(daemon), false),
    };
    if required || path.exists() {
        // Read it ourselves so a missing or unreadable file names itself plainly.
        let text = std::fs::read_to_string(&path).map_err(|e| ConfigError::File {
            path: path.clone(),
            message: e.to_string(),
        })?;
        builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
    }

    let invalid = |e: config::ConfigError| ConfigError::Invalid(e.to_string());
    for (name, value) in env {
        let Some(rest) = name.strip_prefix("CONVOY_") else {
            continue;
        };
        let key = rest.to_ascii_lowercase().replace("__", ".");
        let top = key.split('.').next().unwrap_or_default();
        if known.contains(top) {
            builder = builder.set_override(key, value).map_err(invalid)?;
        }
    }
    for flag in &args.set {
        let (key, value) = flag
            .split_once('=')
            .filter(|(k, _)| !k.trim().is_empty())
            .ok_or_else(|| ConfigError::BadFlag(flag.clone()))?;
        builder = builder
            .set_override(key.trim(), value.to_owned())
            .map_err(invalid)?;
    }

    let merged = builder
        .build()
        .map_err(|e| file_error(&path, required, e))?;
    merged
        .try_deserialize::<T>()
        .map_err(|e| file_error(&path, required || path.exists(), e))
}

fn file_error(path: &Path, from_file: bool, e: config::ConfigError) -> ConfigError {
    let message = e.to_string();
    if from_file {
        ConfigError::File {
            path: path.to_owned(),
            message,
        }
    } else {
        ConfigError::Invalid(message)
    }
}

fn top_level_keys<T: Serialize>(value: &T) -> BTreeSet<String> {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::Object(map)) => map.keys().cloned().collect(),
        _ => BTreeSet::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Sample {
        amqp_url: String,
        exchange: String,
        interval_s: u32,
        labels: std::collections::BTreeMap<String, String>,
        bus: Tuning,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Tuning {
        heartbeat_s: u16,
    }

    impl Default for Tuning {
        fn default() -> Self {
            Self { heartbeat_s: 30 }
        }
    }

    impl Default for Sample {
        fn default() -> Self {
            Self {
                amqp_url: "amqp://default".into(),
                exchange: "convoy".into(),
                interval_s: 10,
                labels: Default::default(),
                bus: Tuning::default(),
            }
        }
    }

    fn args(file: Option<&Path>, set: &[&str]) -> ConfigArgs {
        ConfigArgs {
            config: file.map(Path::to_owned),
            set: set.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn layers_apply_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(
            &file,
            "interval_s = 20\nexchange = \"from-file\"\n[labels]\nrole = \"web\"\n[bus]\nheartbeat_s = 15\n",
        )
        .unwrap();
        let s: Sample = load_from(
            "agent",
            &args(Some(&file), &["interval_s=40"]),
            env(&[
                ("CONVOY_EXCHANGE", "from-env"),
                ("CONVOY_INTERVAL_S", "30"),
                ("CONVOY_BUS__HEARTBEAT_S", "5"),
                ("CONVOY_SOMETHING_ELSE", "ignored"),
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(s.amqp_url, "amqp://default");
        assert_eq!(s.exchange, "from-env");
        assert_eq!(s.interval_s, 40);
        assert_eq!(s.bus.heartbeat_s, 5);
        assert_eq!(s.labels.get("role").map(String::as_str), Some("web"));
    }

    #[test]
    fn an_unknown_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(&file, "[bus]\nheartbeet_s = 15\n").unwrap();
        let err = load_from::<Sample>("agent", &args(Some(&file), &[]), env(&[])).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("heartbeet_s"), "{text}");
        assert!(text.contains("agent.toml"), "{text}");
    }

    #[test]
    fn a_bad_value_is_named() {
        let err = load_from::<Sample>(
            "agent",
            &args(None, &[]),
            env(&[("CONVOY_INTERVAL_S", "soon")]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("interval_s"), "{err}");
        let err = load_from::<Sample>("agent", &args(None, &["bus.heartbeat_s=-1"]), env(&[]))
            .unwrap_err();
        assert!(err.to_string().contains("heartbeat_s"), "{err}");
    }

    #[test]
    fn a_missing_explicit_file_is_an_error() {
        let err = load_from::<Sample>(
            "agent",
            &args(Some(Path::new("/nonexistent/agent.toml")), &[]),
            env(&[]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/agent.toml"), "{err}");
        assert!(matches!(
            load_from::<Sample>("agent", &args(None, &["novalue"]), env(&[])),
            Err(ConfigError::BadFlag(_))
        ));
    }
}
