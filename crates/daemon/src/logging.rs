//! Logging: journald when systemd connected our output to the journal (it sets
//! `JOURNAL_STREAM`), human-readable text on stderr otherwise. The level comes from
//! `CONVOY_LOG` (then `RUST_LOG`), default `info`.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::prelude::*;

/// `info`, but lapin's own warnings (it logs every returned message with its whole body)
/// only as errors: convoy reports unroutable publishes itself, in one readable line.
pub const DEFAULT_FILTER: &str = "info,lapin=error";

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init(daemon: &str) {
    let filter = std::env::var("CONVOY_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(DEFAULT_FILTER));
    let registry = tracing_subscriber::registry().with(filter);
    if std::env::var_os("JOURNAL_STREAM").is_some()
        && let Ok(journald) = tracing_journald::layer()
    {
        let _ = registry
            .with(journald.with_syslog_identifier(format!("convoy-{daemon}")))
            .try_init();
        return;
    }
    let _ = registry
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false),
        )
        .try_init();
}
