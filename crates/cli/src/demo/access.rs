//! The demo's broker access, set up as an operator would with `convoy bus setup`: a
//! virtual host of its own and one least-privilege user per daemon — when the broker is on
//! this machine and we are root (rabbitmqctl needs both). Otherwise every daemon uses the
//! URL the demo was given, on an exchange of the demo's own.

use crate::amqp_url::AmqpUrl;
use crate::bus_setup::{self, SetupArgs};
use crate::rabbitmqctl::Rabbitmqctl;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// A broker node that takes longer than this to answer rabbitmqctl is not worth waiting for:
/// the demo goes on without least-privilege users.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// Users, their URLs, and what to delete at the end.
pub struct Access {
    pub vhost: String,
    users: Vec<String>,
    node: Option<String>,
    /// `conductor`, `hook`, `ci`, `agent-<host>`, `fetcher-<host>`, `heartbeat-<host>` → URL.
    urls: BTreeMap<String, String>,
}

impl Access {
    /// Runs `bus setup` for the demo, or says why it cannot.
    pub fn set_up(
        admin_url: &str,
        node: Option<String>,
        exchange: &str,
        hosts: &[String],
    ) -> anyhow::Result<Self> {
        let url = AmqpUrl::parse(admin_url)?;
        let local = ["127.0.0.1", "localhost", "[::1]"]
            .iter()
            .any(|h| url.host == *h || url.host.starts_with(&format!("{h}:")));
        if !local || !nix::unistd::geteuid().is_root() {
            anyhow::bail!("it takes root and a broker on this machine (rabbitmqctl)");
        }
        // The exchange name is unique to this run: the vhost and users are named after it.
        let args = SetupArgs {
            amqp_url: admin_url.to_owned(),
            vhost: Some(exchange.to_owned()),
            exchange: Some(exchange.to_owned()),
            hosts: hosts.to_vec(),
            conductor_config: None,
            rotate: None,
            user_prefix: format!("{exchange}-"),
            broker_url: None,
            rabbitmqctl: PathBuf::from("rabbitmqctl"),
            node: node.clone(),
            timeout: CALL_TIMEOUT.as_secs(),
        };
        let result = bus_setup::run(&args);
        let report = match result {
            Ok(r) => r,
            Err(e) => {
                // Leave nothing half made.
                if let Ok(ctl) = Rabbitmqctl::new(&args.rabbitmqctl, node, CALL_TIMEOUT) {
                    let _ = ctl.delete_vhost(exchange);
                    if let Ok(defs) = ctl.definitions() {
                        let ours: Vec<String> = defs
                            .users
                            .into_iter()
                            .map(|u| u.name)
                            .filter(|n| n.starts_with(&args.user_prefix))
                            .collect();
                        let _ = ctl.delete_users(&ours);
                    }
                }
                return Err(e);
            }
        };
        let mut urls = BTreeMap::new();
        let mut users = Vec::new();
        for u in &report.users {
            users.push(u.user.clone());
            let key = match &u.host {
                Some(h) => format!("{}-{h}", u.role),
                None => u.role.to_owned(),
            };
            if let Some(url) = &u.amqp_url {
                urls.insert(key, url.clone());
            }
        }
        Ok(Self {
            vhost: report.vhost,
            users,
            node,
            urls,
        })
    }

    /// Each daemon's URL by key (see [`Access::urls`]).
    pub fn urls(&self) -> BTreeMap<String, String> {
        self.urls.clone()
    }

    /// Deletes the virtual host (with every queue in it) and the users.
    pub fn tear_down(&self) -> anyhow::Result<()> {
        let ctl = Rabbitmqctl::new(
            &PathBuf::from("rabbitmqctl"),
            self.node.clone(),
            CALL_TIMEOUT,
        )?;
        let vhost = ctl.delete_vhost(&self.vhost);
        let users = ctl.delete_users(&self.users);
        vhost.and(users)
    }
}
