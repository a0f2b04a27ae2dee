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
//! exist (see [`crate::topology::shared_channel`]), which `convoy bus setup` declares.

use convoy_message::names::HostName;
use convoy_message::routing::queue;

/// Who connects to the broker. The three host daemons get a user each: they run as
/// different system users (the agent as root, the fetcher — which talks to git servers —
/// and the heartbeat unprivileged), so a compromised fetcher must not be able to read its
/// host's commands or report deploys that never happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// The coordinator: consumes every event and heartbeat, sends commands to every host.
    Conductor,
    /// `convoy-hook`: publishes push events only.
    Hook,
    /// `convoy-ci` (bridge and `notify`): consumes pushes, publishes build events.
    Ci,
    /// One host's agent: its own command queue; progress, results and inventories about
    /// itself.
    Agent(HostName),
    /// One host's fetcher: its own fetcher queue (bound to push keys); fetch reports about
    /// itself.
    Fetcher(HostName),
    /// One host's heartbeat: its own heartbeats.
    Heartbeat(HostName),
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
    /// The roles of one host's daemons.
    pub fn host(host: &HostName) -> [Role; 3] {
        [
            Role::Agent(host.clone()),
            Role::Fetcher(host.clone()),
            Role::Heartbeat(host.clone()),
        ]
    }

    /// `conductor`, `hook`, `ci`, `agent`, `fetcher` or `heartbeat`.
    pub fn kind(&self) -> &'static str {
        match self {
            Role::Conductor => "conductor",
            Role::Hook => "hook",
            Role::Ci => "ci",
            Role::Agent(_) => "agent",
            Role::Fetcher(_) => "fetcher",
            Role::Heartbeat(_) => "heartbeat",
        }
    }

    /// The host of a host daemon's role.
    pub fn host_name(&self) -> Option<&HostName> {
        match self {
            Role::Agent(h) | Role::Fetcher(h) | Role::Heartbeat(h) => Some(h),
            _ => None,
        }
    }

    /// The broker user name: `<prefix>conductor`, `<prefix>hook`, `<prefix>ci`,
    /// `<prefix>agent-<host>`, `<prefix>fetcher-<host>`, `<prefix>heartbeat-<host>`.
    pub fn user(&self, prefix: &str) -> String {
        match self.host_name() {
            Some(host) => format!("{prefix}{}-{host}", self.kind()),
            None => format!("{prefix}{}", self.kind()),
        }
    }

    /// The daemon that logs in as this user.
    pub fn daemon(&self) -> &'static str {
        match self {
            Role::Conductor => "convoy-conductor",
            Role::Hook => "convoy-hook",
            Role::Ci => "convoy-ci",
            Role::Agent(_) => "convoy-agent",
            Role::Fetcher(_) => "convoy-fetcher",
            Role::Heartbeat(_) => "convoy-heartbeat",
        }
    }

    /// The narrowest permissions this role works with on `exchange`.
    pub fn grants(&self, exchange: &str) -> Grants {
        let ex = escape(exchange);
        let dead = escape(&queue::dead(exchange));
        // A consumer: declares and binds its own queue, consumes it, copies refused
        // messages to the dead-letter exchange.
        let consumer = |own: &str, topic_write: String, topic_read: String| Grants {
            configure: format!("^{own}$"),
            write: format!("^({ex}|{dead}|{own})$"),
            read: format!("^({ex}|{own})$"),
            topic_write,
            topic_read,
        };
        match self {
            Role::Conductor => {
                let events = escape(&queue::conductor(exchange));
                let beats = escape(&queue::heartbeats(exchange));
                let progress = escape(&queue::progress(exchange));
                let own = format!("{events}|{beats}|{progress}");
                // Every host's command queue: the conductor declares one before its first
                // command to a host, so the command waits for an agent not yet started.
                let commands = format!("{ex}\\.cmd\\.[^.]+");
                // It also reads the dead-letter queue, taking what any consumer refused
                // into its store (`convoy dead-letters`).
                Grants {
                    configure: format!("^({own}|{commands})$"),
                    write: format!("^({ex}|{dead}|{own}|{commands})$"),
                    read: format!("^({ex}|{dead}|{own}|{commands})$"),
                    topic_write: "^cmd\\.[^.]+$".into(),
                    // Binding keys: `deploy.#` only to remove it (what 0.1 bound); results
                    // and each progress step are bound as `deploy.*.*.<step>`.
                    topic_read: "^((push|build|fetch|deploy|inventory|heartbeat)\\.#|deploy\\.\\*\\.\\*\\.[a-z_]+|cmd\\.[^.]+)$"
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
            Role::Ci => consumer(
                &escape(&queue::ci(exchange)),
                "^build\\.[^.]+\\.[^.]+$".into(),
                "^push\\.#$".into(),
            ),
            Role::Agent(host) => {
                let word = escape(&host.routing_word());
                consumer(
                    &escape(&queue::commands(exchange, host)),
                    format!("^(deploy\\.[^.]+\\.{word}\\.[^.]+|inventory\\.{word})$"),
                    format!("^cmd\\.{word}$"),
                )
            }
            Role::Fetcher(host) => {
                let word = escape(&host.routing_word());
                consumer(
                    &escape(&queue::fetcher(exchange, host)),
                    format!("^fetch\\.[^.]+\\.{word}$"),
                    "^push\\.[^.]+$".into(),
                )
            }
            Role::Heartbeat(host) => Grants {
                configure: NOTHING.into(),
                write: format!("^{ex}$"),
                read: NOTHING.into(),
                topic_write: format!("^heartbeat\\.{}$", escape(&host.routing_word())),
                topic_read: NOTHING.into(),
            },
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
    fn each_host_daemon_gets_its_own_queue_and_keys_only() {
        let host = HostName::new("web-1.dc1").unwrap();
        let [agent, fetcher, heartbeat] = Role::host(&host);
        assert_eq!(agent.user("convoy-"), "convoy-agent-web-1.dc1");
        let g = agent.grants("convoy");
        assert_eq!(g.configure, r"^convoy\.cmd\.web-1_dc1$");
        assert_eq!(g.write, r"^(convoy|convoy\.dead|convoy\.cmd\.web-1_dc1)$");
        assert_eq!(g.read, r"^(convoy|convoy\.cmd\.web-1_dc1)$");
        assert_eq!(
            g.topic_write,
            r"^(deploy\.[^.]+\.web-1_dc1\.[^.]+|inventory\.web-1_dc1)$"
        );
        assert_eq!(g.topic_read, r"^cmd\.web-1_dc1$");
        let f = fetcher.grants("convoy");
        assert_eq!(f.configure, r"^convoy\.fetcher\.web-1_dc1$");
        assert_eq!(f.topic_write, r"^fetch\.[^.]+\.web-1_dc1$");
        let h = heartbeat.grants("convoy");
        assert_eq!((h.configure.as_str(), h.read.as_str()), (NOTHING, NOTHING));
        assert_eq!(h.topic_write, r"^heartbeat\.web-1_dc1$");
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
    fn only_the_conductor_reads_the_dead_letter_queue() {
        let read = |role: Role| regex_lite_match(&role.grants("convoy").read, "convoy.dead");
        assert!(read(Role::Conductor));
        let host = HostName::new("web1").unwrap();
        for role in [Role::Hook, Role::Ci].into_iter().chain(Role::host(&host)) {
            assert!(!read(role.clone()), "{role:?} may read the dead letters");
        }
    }

    /// Whether `pattern` (an anchored alternation of escaped names, as these are) matches.
    fn regex_lite_match(pattern: &str, name: &str) -> bool {
        let inner = pattern.trim_start_matches('^').trim_end_matches('$');
        let inner = inner
            .strip_prefix('(')
            .and_then(|i| i.strip_suffix(')'))
            .unwrap_or(inner);
        inner.split('|').any(|alt| alt == escape(name))
    }

    #[test]
    fn exchange_names_are_escaped() {
        assert_eq!(escape("a.b+c"), r"a\.b\+c");
        let g = Role::Ci.grants("my.ex");
        assert_eq!(g.configure, r"^my\.ex\.ci$");
    }
}
