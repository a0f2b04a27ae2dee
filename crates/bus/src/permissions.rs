//! Least-privilege broker users: what each convoy role may configure, write and read on the
//! broker, and which routing keys it may publish and bind on the topic exchange. `convoy bus
//! setup` applies these with `rabbitmqctl`; `docs/security.md` explains them.
//!
//! What RabbitMQ checks (per vhost; each permission is a regular expression over resource
//! names, queues and exchanges alike):
//!
//! - **configure**: declaring (not passively) or deleting a queue or an exchange;
//! - **write**: publishing to an exchange; being the destination (queue) of a binding; a
//!   queue declared with `x-dead-letter-exchange` needs write on that exchange;
//! - **read**: consuming from a queue; being the source (exchange) of a binding; a queue
//!   declared with a dead-letter exchange needs read on the queue itself.
//!
//! Topic permissions on the topic exchange add: **write** is matched against the routing key
//! of every publish, **read** against the binding key of every `queue.bind`. Without topic
//! permissions every key is allowed, so every role here has them.
//!
//! Passive declarations need no permission: the daemons only check that the shared objects
//! exist (see [`crate::topology::ensure_shared`]), which `convoy bus setup` declares.

use convoy_message::names::HostName;
use convoy_message::routing::queue;

/// Who connects to the broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// The coordinator: consumes every event and heartbeat, sends commands to every host.
    Conductor,
    /// `convoy-hook`: publishes push events only.
    Hook,
    /// `convoy-ci` (bridge and `notify`): consumes pushes, publishes build events.
    Ci,
    /// One host's agent, fetcher and heartbeat: its own command and fetcher queues, and
    /// events about itself only.
    Host(HostName),
}

/// One user's permissions, as `rabbitmqctl set_permissions` and `set_topic_permissions`
/// take them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Grants {
    pub configure: String,
    pub write: String,
    pub read: String,
    /// Routing keys it may publish on the topic exchange.
    pub topic_write: String,
    /// Binding keys it may bind its queues with on the topic exchange.
    pub topic_read: String,
}

/// Matches nothing.
pub const NOTHING: &str = "^$";

impl Role {
    /// `conductor`, `hook`, `ci` or `host`.
    pub fn kind(&self) -> &'static str {
        match self {
            Role::Conductor => "conductor",
            Role::Hook => "hook",
            Role::Ci => "ci",
            Role::Host(_) => "host",
        }
    }

    /// The broker user name: `<prefix>conductor`, …, `<prefix>host-<host>`.
    pub fn user(&self, prefix: &str) -> String {
        match self {
            Role::Host(host) => format!("{prefix}host-{host}"),
            other => format!("{prefix}{}", other.kind()),
        }
    }

    /// The daemons that log in as this user.
    pub fn daemons(&self) -> &'static [&'static str] {
        match self {
            Role::Conductor => &["convoy-conductor"],
            Role::Hook => &["convoy-hook"],
            Role::Ci => &["convoy-ci"],
            Role::Host(_) => &["convoy-agent", "convoy-fetcher", "convoy-heartbeat"],
        }
    }

    /// The narrowest permissions this role works with on `exchange`.
    pub fn grants(&self, exchange: &str) -> Grants {
        let ex = escape(exchange);
        let dead = escape(&queue::dead(exchange));
        match self {
            Role::Conductor => {
                let events = escape(&queue::conductor(exchange));
                let beats = escape(&queue::heartbeats(exchange));
                // Every host's command queue: the conductor declares one before its first
                // command to a host, so the command waits for an agent not yet started.
                let commands = format!("{ex}\\.cmd\\.[^.]+");
                Grants {
                    configure: format!("^({events}|{beats}|{commands})$"),
                    write: format!("^({ex}|{dead}|{events}|{beats}|{commands})$"),
                    read: format!("^({ex}|{events}|{beats}|{commands})$"),
                    topic_write: "^cmd\\.[^.]+$".into(),
                    topic_read: "^((push|build|fetch|deploy|inventory|heartbeat)\\.#|cmd\\.[^.]+)$"
                        .into(),
                }
            }
            Role::Hook => Grants {
                configure: NOTHING.into(),
                write: format!("^{ex}$"),
                read: NOTHING.into(),
                topic_write: "^push\\.[^.]+$".into(),
                topic_read: NOTHING.into(),
            },
            Role::Ci => {
                let ci = escape(&queue::ci(exchange));
                Grants {
                    configure: format!("^{ci}$"),
                    write: format!("^({ex}|{dead}|{ci})$"),
                    read: format!("^({ex}|{ci})$"),
                    topic_write: "^build\\.[^.]+\\.[^.]+$".into(),
                    topic_read: "^push\\.#$".into(),
                }
            }
            Role::Host(host) => {
                let word = escape(&host.routing_word());
                let commands = escape(&queue::commands(exchange, host));
                let fetcher = escape(&queue::fetcher(exchange, host));
                Grants {
                    configure: format!("^({commands}|{fetcher})$"),
                    write: format!("^({ex}|{dead}|{commands}|{fetcher})$"),
                    read: format!("^({ex}|{commands}|{fetcher})$"),
                    topic_write: format!(
                        "^(deploy\\.[^.]+\\.{word}\\.[^.]+|inventory\\.{word}|heartbeat\\.{word}|fetch\\.[^.]+\\.{word})$"
                    ),
                    topic_read: format!("^(cmd\\.{word}|push\\.[^.]+)$"),
                }
            }
        }
    }
}

/// `text` as a regular expression matching exactly itself.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if "\\.^$|?*+()[]{}".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_gets_its_own_queues_and_keys_only() {
        let host = HostName::new("web-1.dc1").unwrap();
        let role = Role::Host(host);
        assert_eq!(role.user("convoy-"), "convoy-host-web-1.dc1");
        let g = role.grants("convoy");
        assert_eq!(
            g.configure,
            r"^(convoy\.cmd\.web-1_dc1|convoy\.fetcher\.web-1_dc1)$"
        );
        assert_eq!(
            g.write,
            r"^(convoy|convoy\.dead|convoy\.cmd\.web-1_dc1|convoy\.fetcher\.web-1_dc1)$"
        );
        assert_eq!(
            g.read,
            r"^(convoy|convoy\.cmd\.web-1_dc1|convoy\.fetcher\.web-1_dc1)$"
        );
        assert!(g.topic_write.contains(r"deploy\.[^.]+\.web-1_dc1\.[^.]+"));
        assert!(g.topic_read.contains(r"cmd\.web-1_dc1"));
    }

    #[test]
    fn the_hook_only_publishes_pushes() {
        let g = Role::Hook.grants("convoy");
        assert_eq!(g.configure, NOTHING);
        assert_eq!(g.read, NOTHING);
        assert_eq!(g.write, "^convoy$");
        assert_eq!(g.topic_write, r"^push\.[^.]+$");
    }

    #[test]
    fn exchange_names_are_escaped() {
        assert_eq!(escape("a.b+c"), r"a\.b\+c");
        let g = Role::Ci.grants("my.ex");
        assert_eq!(g.configure, r"^my\.ex\.ci$");
    }
}
