//! What every convoy daemon shares, so each daemon's `main` is a few lines.
//!
//! # Layout
//!
//! - [`settings`]: layered configuration — built-in defaults < `/etc/convoy/<daemon>.toml`
//!   (or `--config`) < `CONVOY_<KEY>` environment variables < `--set key=value` flags. An
//!   unknown key or a bad value is an error that names the key.
//! - [`logging`]: `tracing` to journald under systemd, human-readable on a terminal.
//! - [`lifecycle`]: SIGTERM/SIGINT → graceful shutdown with a deadline, SIGHUP → reload,
//!   `sd_notify` READY / RELOADING / STOPPING / WATCHDOG.
#![forbid(unsafe_code)]

pub mod lifecycle;
pub mod logging;
pub mod settings;

pub use lifecycle::Lifecycle;
pub use settings::{ConfigArgs, ConfigError, load};

use std::future::Future;
use std::process::ExitCode;

/// The exit status for a configuration that cannot be used (sysexits' EX_CONFIG): systemd
/// units list it in `RestartPreventExitStatus`, so a bad config is not retried in a loop.
pub const EXIT_CONFIG: u8 = 78;

/// This host's name: `configured`, or else the system's host name.
pub fn host_name(configured: Option<&str>) -> anyhow::Result<String> {
    match configured {
        Some(h) => Ok(h.to_owned()),
        None => nix::unistd::gethostname()?
            .into_string()
            .map_err(|_| anyhow::anyhow!("the system host name is not UTF-8; set `host`")),
    }
}

/// Loads `daemon`'s config and checks it with `validate`; on failure prints
/// `<program>: <error>` and gives the exit code [`EXIT_CONFIG`].
pub fn load_valid<T>(
    program: &str,
    daemon: &str,
    args: &ConfigArgs,
    validate: impl FnOnce(&T) -> anyhow::Result<()>,
) -> Result<T, ExitCode>
where
    T: serde::Serialize + serde::de::DeserializeOwned + Default,
{
    let fail = |e: String| {
        eprintln!("{program}: {e}");
        ExitCode::from(EXIT_CONFIG)
    };
    let config: T = load(daemon, args).map_err(|e| fail(e.to_string()))?;
    validate(&config).map_err(|e| fail(format!("{e:#}")))?;
    Ok(config)
}

/// For `--check-config`: the bus settings as a start would use them (the URL parses, the
/// exchange name is valid, the CA file reads), without connecting. Prints the problem and
/// gives [`EXIT_CONFIG`] if they cannot work.
pub fn check_bus(program: &str, config: convoy_bus::BusConfig) -> Result<(), ExitCode> {
    convoy_bus::Bus::new(config, format!("{program} --check-config"))
        .map(drop)
        .map_err(|e| {
            eprintln!("{program}: {e}");
            ExitCode::from(EXIT_CONFIG)
        })
}

/// Whether a daemon's error is a bus setting that cannot work (URL, exchange name, CA
/// file): restarting will not fix it, so the daemon exits with [`EXIT_CONFIG`].
pub fn is_config_fault(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<convoy_bus::BusError>()
            .is_some_and(convoy_bus::BusError::is_config)
    })
}

/// The exit status for a daemon's error (already printed): [`EXIT_CONFIG`] with a hint when
/// [`is_config_fault`], else 1.
pub fn failure_code(program: &str, e: &anyhow::Error) -> ExitCode {
    if is_config_fault(e) {
        eprintln!("{program}: fix the configuration and start it again");
        ExitCode::from(EXIT_CONFIG)
    } else {
        ExitCode::FAILURE
    }
}

/// Runs a daemon's main future on a single-threaded runtime (an idle daemon needs no more),
/// printing `<program>: <error>` and failing if it returns an error: with [`EXIT_CONFIG`]
/// when the error is a bus setting that cannot work (URL, exchange, CA file), else 1.
pub fn block_on(program: &str, main: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{program}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("{program}: {e:#}");
            failure_code(program, &e)
        }
    }
}
