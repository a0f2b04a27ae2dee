//! Logging: journald when systemd connected our output to the journal (it sets
//! `JOURNAL_STREAM`), human-readable text on stderr otherwise. The level comes from
//! `CONVOY_LOG` (then `RUST_LOG`), default `info`.
//!
//! The filter is `tracing_subscriber`'s `Targets` (`level` and `target=level` pairs), not
//! `EnvFilter`: the host daemons never need span or field filters, and `EnvFilter`'s regex
//! engine is about 0.5 MB of code, resident in every daemon (docs/benchmarks.md).

use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

/// `info`, but lapin's own warnings (it logs every returned message with its whole body)
/// only as errors: convoy reports unroutable publishes itself, in one readable line.
pub const DEFAULT_FILTER: &str = "info,lapin=error";

/// The filter from `CONVOY_LOG`, else `RUST_LOG`, else the default. A filter that does not
/// parse is reported (naming the variable) and the default used: a typo in a log setting
/// must not keep a daemon from starting.
fn filter() -> (Targets, Option<String>) {
    let default = || DEFAULT_FILTER.parse().unwrap_or_default();
    let Some((var, value)) = ["CONVOY_LOG", "RUST_LOG"].into_iter().find_map(|var| {
        Some((
            var,
            std::env::var(var).ok().filter(|v| !v.trim().is_empty())?,
        ))
    }) else {
        return (default(), None);
    };
    match value.parse::<Targets>() {
        // `debgu` parses too — as a target named "debgu" — and would silence everything
        // else, errors included: a filter must say what the rest logs at.
        Ok(targets) if targets.default_level().is_none() => (
            default(),
            Some(format!(
                "{var}={value:?} sets no level for everything else (a misspelt level is \
                 read as a target name); using {DEFAULT_FILTER:?}. Start it with a level, \
                 e.g. \"info,convoy_bus=debug\""
            )),
        ),
        Ok(targets) => (targets, None),
        Err(e) => (
            default(),
            Some(format!(
                "{var}={value:?} is not a log filter ({e}); using {DEFAULT_FILTER:?}. \
                 Write a level or comma-separated target=level pairs, e.g. \
                 \"debug,lapin=error\""
            )),
        ),
    }
}

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init(daemon: &str) {
    let (filter, complaint) = filter();
    let registry = tracing_subscriber::registry().with(filter);
    if std::env::var_os("JOURNAL_STREAM").is_some()
        && let Ok(journald) = tracing_journald::layer()
    {
        let _ = registry
            .with(journald.with_syslog_identifier(format!("convoy-{daemon}")))
            .try_init();
    } else {
        let _ = registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_target(false),
            )
            .try_init();
    }
    if let Some(complaint) = complaint {
        tracing::warn!("{complaint}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn the_default_keeps_lapin_to_errors() {
        let t: Targets = DEFAULT_FILTER.parse().expect("the default parses");
        assert!(t.would_enable("convoy_agent", &Level::INFO));
        assert!(!t.would_enable("convoy_agent", &Level::DEBUG));
        assert!(!t.would_enable("lapin::channel", &Level::WARN));
        assert!(t.would_enable("lapin::channel", &Level::ERROR));
    }

    #[test]
    fn a_misspelt_level_is_not_taken_for_a_target() {
        let t: Targets = "debgu".parse().expect("parses, as a target");
        assert!(t.default_level().is_none(), "what filter() refuses");
        let t: Targets = "info,convoy_bus=debug".parse().expect("parses");
        assert!(t.default_level().is_some());
    }

    #[test]
    fn documented_filters_parse() {
        for f in [
            "debug,lapin=error",
            "info,convoy_bus=debug",
            "warn",
            "trace",
        ] {
            assert!(f.parse::<Targets>().is_ok(), "{f}");
        }
        let t: Targets = "info,convoy_bus=debug".parse().expect("parses");
        assert!(t.would_enable("convoy_bus::consumer", &Level::DEBUG));
        assert!(!t.would_enable("convoy_agent", &Level::DEBUG));
    }
}
