//! The one list of routing keys and queue names. Keys name what a message is about, so a
//! consumer binds only what it needs. `docs/messages.md` mirrors this module.
//!
//! | routing key                        | kind        | published by        |
//! |------------------------------------|-------------|---------------------|
//! | `push.<repo>`                      | `push`      | convoy-hook         |
//! | `build.<repo>.<status>`            | `build`     | convoy-ci           |
//! | `fetch.<repo>.<host>`              | `fetch`     | convoy-fetcher      |
//! | `cmd.<host>`                       | `command`   | conductor, CLI      |
//! | `deploy.<app>.<host>.<step>`       | `progress`  | convoy-agent        |
//! | `deploy.<app>.<host>.result`       | `result`    | convoy-agent        |
//! | `inventory.<host>`                 | `inventory` | convoy-agent        |
//! | `heartbeat.<host>`                 | `heartbeat` | convoy-heartbeat    |
//!
//! `<host>` is [`HostName::routing_word`] (dots become `_`), so every placeholder is one word.
//!
//! Progress and results share the `deploy.` prefix but not a queue: results go to the
//! conductor's durable event queue (`deploy.*.*.result`), progress to its live progress
//! queue (one binding per step, [`progress_bindings`]).

use crate::body::{BuildStatus, Step};
use crate::envelope::{Body, Message};
use crate::names::{HostName, Name};

pub fn push(repo: &Name) -> String {
    format!("push.{repo}")
}

pub fn build(repo: &Name, status: BuildStatus) -> String {
    format!("build.{repo}.{}", status.as_str())
}

pub fn fetch(repo: &Name, host: &HostName) -> String {
    format!("fetch.{repo}.{}", host.routing_word())
}

pub fn command(host: &HostName) -> String {
    format!("cmd.{}", host.routing_word())
}

/// The binding that takes every result (inventory results included: their app word is `_`).
pub const RESULTS: &str = "deploy.*.*.result";

/// The bindings that take every progress event and no result: one per step.
pub fn progress_bindings() -> Vec<String> {
    Step::ALL
        .iter()
        .map(|s| format!("deploy.*.*.{}", s.as_str()))
        .collect()
}

pub fn progress(app: &Name, host: &HostName, step: Step) -> String {
    format!("deploy.{app}.{}.{}", host.routing_word(), step.as_str())
}

/// Results of commands without an app (inventory) use `_` as the app word.
pub fn result(app: Option<&Name>, host: &HostName) -> String {
    let app = app.map_or("_", Name::as_str);
    format!("deploy.{app}.{}.result", host.routing_word())
}

pub fn inventory(host: &HostName) -> String {
    format!("inventory.{}", host.routing_word())
}

pub fn heartbeat(host: &HostName) -> String {
    format!("heartbeat.{}", host.routing_word())
}

/// The routing key a message is published under. Commands need their host, which only the
/// signer knows, so they are routed with [`command`] directly.
pub fn for_message(message: &Message) -> Option<String> {
    Some(match &message.body {
        Body::Push(p) => push(&p.repo),
        Body::Build(b) => build(&b.repo, b.status),
        Body::Fetch(f) => fetch(&f.repo, &f.host),
        Body::Command(_) => return None,
        Body::Progress(p) => progress(&p.app, &p.host, p.step),
        Body::Result(r) => result(r.app.as_ref(), &r.host),
        Body::Inventory(i) => inventory(&i.host),
        Body::Heartbeat(h) => heartbeat(&h.host),
    })
}

/// Queue names, all prefixed with the exchange name so that two convoy installations (or
/// two tests) on one broker never share a queue.
pub mod queue {
    use crate::names::HostName;

    /// A host's command queue (single active consumer: one agent per host executes).
    pub fn commands(exchange: &str, host: &HostName) -> String {
        format!("{exchange}.cmd.{}", host.routing_word())
    }

    /// A host's fetcher queue, bound to the push keys of the repos it mirrors.
    pub fn fetcher(exchange: &str, host: &HostName) -> String {
        format!("{exchange}.fetcher.{}", host.routing_word())
    }

    /// The CI bridge's push queue.
    pub fn ci(exchange: &str) -> String {
        format!("{exchange}.ci")
    }

    /// The conductor's event queue: pushes, builds, fetches, results, inventories.
    pub fn conductor(exchange: &str) -> String {
        format!("{exchange}.conductor")
    }

    /// The conductor's progress queue: live, bounded, not persisted.
    pub fn progress(exchange: &str) -> String {
        format!("{exchange}.progress")
    }

    /// The conductor's heartbeat queue, bounded: only the newest heartbeats matter.
    pub fn heartbeats(exchange: &str) -> String {
        format!("{exchange}.heartbeats")
    }

    /// Where refused messages go, with the reason in headers.
    pub fn dead(exchange: &str) -> String {
        format!("{exchange}.dead")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_keep_one_word_per_placeholder() {
        let host = HostName::new("web-1.dc1").unwrap();
        let app = Name::new("shop").unwrap();
        assert_eq!(command(&host), "cmd.web-1_dc1");
        assert_eq!(
            progress(&app, &host, Step::PreSwitch),
            "deploy.shop.web-1_dc1.pre_switch"
        );
        assert_eq!(result(Some(&app), &host), "deploy.shop.web-1_dc1.result");
        assert_eq!(result(None, &host), "deploy._.web-1_dc1.result");
        assert_eq!(queue::commands("convoy", &host), "convoy.cmd.web-1_dc1");
    }

    /// A topic match of `key` against `pattern` with `*` only (all convoy's split bindings use).
    fn matches(pattern: &str, key: &str) -> bool {
        let (p, k): (Vec<_>, Vec<_>) = (pattern.split('.').collect(), key.split('.').collect());
        p.len() == k.len() && p.iter().zip(&k).all(|(p, k)| *p == "*" || p == k)
    }

    #[test]
    fn progress_and_results_are_bound_apart() {
        let host = HostName::new("web-1.dc1").unwrap();
        let app = Name::new("shop").unwrap();
        let bindings = progress_bindings();
        for step in Step::ALL {
            let key = progress(&app, &host, step);
            assert!(bindings.iter().any(|b| matches(b, &key)), "{key} unbound");
            assert!(!matches(RESULTS, &key), "{key} would reach the results");
        }
        for key in [result(Some(&app), &host), result(None, &host)] {
            assert!(matches(RESULTS, &key), "{key} unbound");
            assert!(
                !bindings.iter().any(|b| matches(b, &key)),
                "{key} would reach progress"
            );
        }
    }
}
