//! `convoy bus setup`: declares convoy's broker objects and creates one broker user per
//! role (conductor, hook, ci) and per host daemon (agent, fetcher, heartbeat), each with the
//! narrowest permissions ([`convoy_bus::permissions`]), and prints the credentials to hand
//! out.
//!
//! The exchanges and queues are declared over AMQP as an administrator, with the same
//! [`convoy_bus::topology`] code the daemons use, so names and arguments never drift.
//! Virtual hosts, users and permissions go through `rabbitmqctl` (no management plugin):
//! one `export_definitions` to see what exists, one `import_definitions` to add what is
//! missing or different.
//! Running it again changes nothing that is right already: existing users keep their
//! passwords unless `--rotate`, and permissions are set only where they differ.

use crate::amqp_url::AmqpUrl;
use crate::rabbitmqctl::{Rabbitmqctl, password_hash};
use anyhow::Context;
use convoy_bus::permissions::{Grants, Role};
use convoy_bus::{Bus, BusConfig, DEFAULT_AMQP_URL, DEFAULT_EXCHANGE, QueueSpec, topology};
use convoy_message::names::{HostName, Name};
use serde::Serialize;
use serde_json::json;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Clone, Debug)]
pub struct SetupArgs {
    /// An administrator's broker URL, used to declare the exchanges and queues.
    #[arg(long, env = "CONVOY_AMQP_URL", default_value = DEFAULT_AMQP_URL, hide_env_values = true)]
    pub amqp_url: String,
    /// The virtual host (default: the one in --amqp-url). Created when missing.
    #[arg(long)]
    pub vhost: Option<String>,
    /// The exchange (default: CONVOY_EXCHANGE, else the conductor config's, else `convoy`).
    #[arg(long, env = "CONVOY_EXCHANGE")]
    pub exchange: Option<String>,
    /// Hosts to create a user and queues for: `web1,web2,db1`.
    #[arg(long, value_delimiter = ',')]
    pub hosts: Vec<String>,
    /// Take hosts (every stage's `hosts`) and the exchange from this conductor config too.
    #[arg(long, value_name = "PATH")]
    pub conductor_config: Option<PathBuf>,
    /// Give users that exist already new passwords (default: keep them, print none): all of
    /// them, or only those named — `conductor`, `hook`, `ci`, or a host (its three users):
    /// `--rotate web3,ci`.
    #[arg(long, value_name = "WHO", num_args = 0.., value_delimiter = ',')]
    pub rotate: Option<Vec<String>>,
    /// What every user name starts with; give each convoy installation on one broker its own.
    #[arg(long, default_value = "convoy-")]
    pub user_prefix: String,
    /// How the daemons reach the broker, for the printed URLs (default: the host of
    /// --amqp-url), e.g. `amqps://mq.example.com:5671`.
    #[arg(long)]
    pub broker_url: Option<String>,
    /// The rabbitmqctl to run (it needs root or the rabbitmq user, on a broker machine).
    #[arg(long, default_value = "rabbitmqctl")]
    pub rabbitmqctl: PathBuf,
    /// The RabbitMQ node rabbitmqctl talks to (its `-n`; default: the local node).
    #[arg(long)]
    pub node: Option<String>,
    /// Seconds one rabbitmqctl call may take.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
}

/// What `bus setup` did, printed as text or JSON.
#[derive(Debug, Serialize)]
pub struct Report {
    pub vhost: String,
    pub vhost_created: bool,
    pub exchange: String,
    pub exchanges: Vec<String>,
    pub queues: Vec<String>,
    /// Where the dead-letter queue's delivery limit comes from: `argument` (the queue's
    /// own), or `policy <name>` for a queue an earlier convoy made without it.
    pub dead_letter_limit: String,
    pub users: Vec<UserReport>,
}

#[derive(Debug, Serialize)]
pub struct UserReport {
    pub user: String,
    /// `conductor`, `hook`, `ci`, `agent`, `fetcher` or `heartbeat`.
    pub role: &'static str,
    /// The host of an agent, fetcher or heartbeat.
    pub host: Option<String>,
    /// The daemon that logs in as this user.
    pub daemon: &'static str,
    /// Its config file.
    pub config: &'static str,
    /// `created`, `rotated` (new password) or `kept` (password unchanged, not shown).
    pub status: &'static str,
    /// Whether its permissions were set now (false: they were right already).
    pub permissions_set: bool,
    pub password: Option<String>,
    /// The daemons' `amqp_url`, when the password is known.
    pub amqp_url: Option<String>,
    pub permissions: Grants,
}

/// A problem with the arguments, found before anything was changed (exit code 2).
#[derive(Debug)]
pub struct BadUsage(pub String);

impl std::fmt::Display for BadUsage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadUsage {}

/// Everything `bus setup` will do, checked.
struct Plan {
    admin: AmqpUrl,
    public: AmqpUrl,
    vhost: String,
    exchange: String,
    roles: Vec<Role>,
    /// Whose passwords `--rotate` replaces: `None` nobody's; an empty set everybody's; else
    /// the central roles (`conductor`, `hook`, `ci`) and hosts (routing words) named.
    rotate: Option<BTreeSet<String>>,
}

fn plan(args: &SetupArgs) -> Result<Plan, BadUsage> {
    let bad = |e: anyhow::Error| BadUsage(format!("{e:#}"));
    let admin = AmqpUrl::parse(&args.amqp_url).map_err(bad)?;
    let vhost = args.vhost.clone().unwrap_or_else(|| admin.vhost.clone());
    if vhost.is_empty() {
        return Err(BadUsage("--vhost must not be empty".into()));
    }
    let mut hosts = args.hosts.clone();
    let mut exchange = args.exchange.clone();
    if let Some(path) = &args.conductor_config {
        let (more, ex) = read_conductor_config(path).map_err(bad)?;
        hosts.extend(more);
        exchange = exchange.or(ex);
    }
    let exchange = exchange.unwrap_or_else(|| DEFAULT_EXCHANGE.to_owned());
    if exchange.is_empty()
        || exchange
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(BadUsage(format!(
            "--exchange {exchange:?}: give a name without spaces"
        )));
    }
    let prefix = &args.user_prefix;
    if prefix
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == ':')
    {
        return Err(BadUsage(format!(
            "--user-prefix {prefix:?}: no spaces or colons"
        )));
    }
    let mut roles = vec![Role::Conductor, Role::Hook, Role::Ci];
    let mut seen = BTreeSet::new();
    for h in hosts.iter().map(|h| h.trim()).filter(|h| !h.is_empty()) {
        let host = HostName::new(h).map_err(|e| {
            BadUsage(format!(
                "host {h:?}: {e} (hosts are named as in their agent.toml)"
            ))
        })?;
        if seen.insert(host.routing_word()) {
            roles.extend(Role::host(&host));
        }
    }
    let rotate = match &args.rotate {
        None => None,
        Some(names) => {
            let mut who = BTreeSet::new();
            for n in names.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
                if roles
                    .iter()
                    .any(|r| r.host_name().is_none() && r.kind() == n)
                {
                    who.insert(n.to_owned());
                    continue;
                }
                let word = HostName::new(n).ok().map(|h| h.routing_word());
                match word {
                    Some(w) if seen.contains(&w) => {
                        who.insert(w);
                    }
                    _ => {
                        return Err(BadUsage(format!(
                            "--rotate {n}: neither conductor, hook, ci nor a host of this setup \
                             (name it in --hosts, or in a stage of --conductor-config, too)"
                        )));
                    }
                }
            }
            Some(who)
        }
    };
    let public = match &args.broker_url {
        Some(u) => AmqpUrl::parse(u).map_err(bad)?,
        None => admin.clone(),
    }
    .with_vhost(&vhost);
    Ok(Plan {
        admin: admin.with_vhost(&vhost),
        public,
        vhost,
        exchange,
        roles,
        rotate,
    })
}

impl Plan {
    /// Whether `role`'s existing user gets a new password.
    fn rotates(&self, role: &Role) -> bool {
        match &self.rotate {
            None => false,
            Some(who) if who.is_empty() => true,
            Some(who) => match role.host_name() {
                Some(host) => who.contains(&host.routing_word()),
                None => who.contains(role.kind()),
            },
        }
    }
}

/// Hosts named by the stages of a conductor config, and its exchange if it sets one.
pub fn read_conductor_config(path: &Path) -> anyhow::Result<(Vec<String>, Option<String>)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the conductor config {}", path.display()))?;
    let table: toml::Table = toml::from_str(&text)
        .with_context(|| format!("the conductor config {} is not valid TOML", path.display()))?;
    let exchange = table
        .get("exchange")
        .and_then(|e| e.as_str())
        .map(str::to_owned);
    let mut hosts = Vec::new();
    let apps = table.get("apps").and_then(|a| a.as_table());
    for (name, app) in apps.into_iter().flatten() {
        let stages = app.get("stages").and_then(|s| s.as_array());
        for (i, stage) in stages.into_iter().flatten().enumerate() {
            let Some(list) = stage.get("hosts") else {
                continue;
            };
            let list = list.as_array().with_context(|| {
                format!(
                    "{}: apps.{name}.stages[{i}].hosts must be a list",
                    path.display()
                )
            })?;
            for h in list {
                let h = h.as_str().with_context(|| {
                    format!(
                        "{}: apps.{name}.stages[{i}].hosts holds a non-string",
                        path.display()
                    )
                })?;
                hosts.push(h.to_owned());
            }
        }
    }
    Ok((hosts, exchange))
}

/// Runs `bus setup`.
pub fn run(args: &SetupArgs) -> anyhow::Result<Report> {
    let plan = plan(args)?;
    let ctl = Rabbitmqctl::new(
        &args.rabbitmqctl,
        args.node.clone(),
        std::time::Duration::from_secs(args.timeout),
    )?;
    let before = ctl.definitions()?;
    let admin = plan.admin.user.clone().unwrap_or_else(|| "guest".into());

    // 1. The virtual host, and rights in it for the administrator who declares next.
    let vhost_created = !before.has_vhost(&plan.vhost);
    if vhost_created {
        ctl.import(&json!({
            "vhosts": [{ "name": plan.vhost }],
            "permissions": [{ "user": admin, "vhost": plan.vhost,
                              "configure": ".*", "write": ".*", "read": ".*" }],
        }))?;
    }

    // 2. The exchanges and queues, over AMQP, before any user exists that needs them.
    let hosts: Vec<HostName> = plan
        .roles
        .iter()
        .filter_map(|r| match r {
            Role::Agent(h) => Some(h.clone()),
            _ => None,
        })
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let (queues, dead) = runtime
        .block_on(declare_topology(&plan.admin, &plan.exchange, &hosts))
        .with_context(|| {
            format!(
                "declaring the exchanges and queues as {} (that user needs configure, write \
                 and read on vhost {:?}: `rabbitmqctl set_permissions -p {} {admin} '.*' '.*' '.*'`)",
                plan.admin.redacted(),
                plan.vhost,
                plan.vhost,
            )
        })?;

    // A dead-letter queue from before its delivery limit keeps its arguments (they cannot
    // change); a policy gives it the limit instead.
    let dead_letter_limit = match dead {
        topology::DeadQueue::Limited => "argument".to_owned(),
        topology::DeadQueue::Older => {
            older_dead_queue_is_convoys(&before, &plan.vhost, &plan.exchange)?;
            let name = format!("convoy-dead-letters.{}", plan.exchange);
            ctl.import(&dead_letter_policy(&plan.vhost, &plan.exchange, &name))?;
            format!("policy {name}")
        }
    };

    // 3. The users and their permissions, in one import: what is missing or different.
    let mut users = Vec::new();
    let mut new_users = Vec::new();
    let mut permissions = Vec::new();
    let mut topic_permissions = Vec::new();
    for role in &plan.roles {
        let user = role.user(&args.user_prefix);
        let (status, password) = if !before.has_user(&user) {
            ("created", Some(crate::secret::random_hex(24)?))
        } else if plan.rotates(role) {
            ("rotated", Some(crate::secret::random_hex(24)?))
        } else {
            ("kept", None)
        };
        if let Some(p) = &password {
            new_users.push(json!({
                "name": user,
                "password_hash": password_hash(p)?,
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": [],
            }));
        }
        let grants = role.grants(&plan.exchange);
        let set_now = !before.grants_match(&plan.vhost, &user, &plan.exchange, &grants);
        if set_now {
            permissions.push(json!({
                "user": user, "vhost": plan.vhost,
                "configure": grants.configure, "write": grants.write, "read": grants.read,
            }));
            topic_permissions.push(json!({
                "user": user, "vhost": plan.vhost, "exchange": plan.exchange,
                "write": grants.topic_write, "read": grants.topic_read,
            }));
        }
        users.push(UserReport {
            amqp_url: password
                .as_ref()
                .map(|p| plan.public.with_credentials(&user, p).to_string()),
            user,
            role: role.kind(),
            host: role.host_name().map(|h| h.to_string()),
            daemon: role.daemon(),
            config: config_file(role),
            status,
            permissions_set: set_now,
            password,
            permissions: grants,
        });
    }
    if !new_users.is_empty() || !permissions.is_empty() {
        ctl.import(&json!({
            "users": new_users,
            "permissions": permissions,
            "topic_permissions": topic_permissions,
        }))?;
    }
    // rabbitmqctl talks to a node, --amqp-url to a broker: make sure they are the same one.
    if let Some(u) = users.iter().find(|u| u.password.is_some()) {
        let login = plan
            .admin
            .with_credentials(&u.user, u.password.as_deref().unwrap_or_default());
        runtime.block_on(can_log_in(&login)).with_context(|| {
            format!(
                "the new user {} cannot log in at {}: rabbitmqctl reached another node than \
                     --amqp-url names (pass --node NAME@HOST of that broker)",
                u.user,
                plan.admin.redacted()
            )
        })?;
    }
    Ok(Report {
        vhost: plan.vhost,
        vhost_created,
        exchanges: vec![
            plan.exchange.clone(),
            topology::dead_exchange(&plan.exchange),
        ],
        exchange: plan.exchange,
        queues,
        dead_letter_limit,
        users,
    })
}

/// The dead-letter queue the broker refused to redeclare is one an earlier convoy made
/// (durable, quorum, no other argument), not one somebody changed: only that one is kept
/// and given its limit by a policy.
fn older_dead_queue_is_convoys(
    before: &crate::rabbitmqctl::Definitions,
    vhost: &str,
    exchange: &str,
) -> anyhow::Result<()> {
    let name = convoy_message::routing::queue::dead(exchange);
    let earlier = json!({ "x-queue-type": "quorum" });
    match before.queue(vhost, &name) {
        Some(q) if q.durable && serde_json::Value::Object(q.arguments.clone()) == earlier => Ok(()),
        found => anyhow::bail!(
            "queue {name:?} in vhost {vhost:?} exists with other properties than convoy gives \
             it ({}), so it was left as it is and may drop or lose dead letters; read what \
             waits in it (`convoy dead-letters`), delete it (`rabbitmqctl delete_queue -p \
             {vhost} {name}`), and run `convoy bus setup` again",
            match found {
                Some(q) => format!(
                    "durable {}, arguments {}",
                    q.durable,
                    serde_json::Value::Object(q.arguments.clone())
                ),
                None => "it was not there a moment ago".to_owned(),
            }
        ),
    }
}

/// The policy that gives an older dead-letter queue (made without `x-delivery-limit`) the
/// limit new ones are declared with: on RabbitMQ 4 it would otherwise drop a letter after
/// 20 deliveries. Matches that one queue only; a high priority, so a catch-all policy of
/// the operator's does not hide it (RabbitMQ applies one policy per queue).
fn dead_letter_policy(vhost: &str, exchange: &str, name: &str) -> serde_json::Value {
    json!({
        "policies": [{
            "vhost": vhost,
            "name": name,
            "pattern": format!("^{}$", convoy_bus::permissions::escape(
                &convoy_message::routing::queue::dead(exchange))),
            "apply-to": "queues",
            "priority": 100,
            "definition": { "delivery-limit": topology::DEAD_QUEUE_DELIVERY_LIMIT },
        }],
    })
}

/// Connects (and disconnects) as `url`'s user.
async fn can_log_in(url: &AmqpUrl) -> anyhow::Result<()> {
    let mut config = BusConfig::new(url.to_string(), DEFAULT_EXCHANGE);
    config.tuning.connect_timeout_ms = 5_000;
    let bus = Bus::new(config, "convoy bus setup (check)")?;
    bus.connection().await?;
    bus.close().await;
    Ok(())
}

/// Where the daemon of `role` reads its `amqp_url`.
fn config_file(role: &Role) -> &'static str {
    match role {
        Role::Conductor => "/etc/convoy/conductor.toml",
        Role::Hook => "/etc/convoy/hook.toml",
        Role::Ci => "/etc/convoy/ci.toml",
        Role::Agent(_) => "/etc/convoy/agent.toml",
        Role::Fetcher(_) => "/etc/convoy/fetcher.toml",
        Role::Heartbeat(_) => "/etc/convoy/heartbeat.toml",
    }
}

/// Declares both exchanges, the dead-letter queue, the conductor's and the CI bridge's
/// queues, and each host's command and fetcher queues. Returns the queue names, and how
/// the dead-letter queue stands (one an earlier version made is kept as it is).
pub async fn declare_topology(
    admin: &AmqpUrl,
    exchange: &str,
    hosts: &[HostName],
) -> anyhow::Result<(Vec<String>, topology::DeadQueue)> {
    let bus = Bus::new(
        BusConfig::new(admin.to_string(), exchange),
        "convoy bus setup",
    )?;
    let conn = bus.connection().await?;
    let channel = conn.create_channel().await?;
    topology::declare_exchanges(&channel, exchange).await?;
    let dead = topology::declare_dead_queue_or_keep(&conn, exchange).await?;
    let mut specs = vec![
        QueueSpec::conductor_events(exchange),
        QueueSpec::conductor_progress(exchange),
        QueueSpec::conductor_heartbeats(exchange),
        QueueSpec::ci(exchange),
    ];
    for host in hosts {
        specs.push(QueueSpec::commands(exchange, host));
        // Unbound: each fetcher binds the push keys of the repos it mirrors.
        specs.push(QueueSpec::fetcher(
            exchange,
            host,
            std::iter::empty::<&Name>(),
        ));
    }
    for spec in &specs {
        topology::declare_queue(&channel, exchange, spec).await?;
    }
    let _ = channel.close(200, "declared".into()).await;
    bus.close().await;
    let mut names = vec![convoy_message::routing::queue::dead(exchange)];
    names.extend(specs.into_iter().map(|s| s.name));
    Ok((names, dead))
}

/// Prints the report for a person.
pub fn print(report: &Report) {
    println!(
        "vhost {:?}{}, exchange {:?}",
        report.vhost,
        if report.vhost_created {
            " (created)"
        } else {
            ""
        },
        report.exchange
    );
    println!(
        "declared exchanges {} (topic) and {} (fanout, dead letters)",
        report.exchanges[0], report.exchanges[1]
    );
    println!("declared queues {}", report.queues.join(", "));
    if report.dead_letter_limit != "argument" {
        println!(
            "the dead-letter queue predates its delivery limit: set by {} instead (RabbitMQ \
             applies one policy per queue: any other policy that matched it no longer does)",
            report.dead_letter_limit
        );
    }
    println!();
    println!("users (their permissions: docs/security.md, or --json):");
    for u in &report.users {
        let who = match &u.host {
            Some(h) => format!("{} on {h}", u.role),
            None => u.role.to_owned(),
        };
        let status = match (u.status, u.permissions_set) {
            ("kept", false) => "kept, permissions unchanged",
            ("kept", true) => "kept, permissions set",
            (other, _) => other,
        };
        println!("  {:<40} {:<28} {status}", u.user, who);
    }
    let handed: Vec<&UserReport> = report
        .users
        .iter()
        .filter(|u| u.amqp_url.is_some())
        .collect();
    if !handed.is_empty() {
        println!();
        println!("credentials to hand out (shown only now; keep them like any secret):");
        for u in handed {
            let place = match (u.role, &u.host) {
                (_, Some(h)) => format!("on {h}"),
                ("hook", None) => "on the git server (and the webhook receiver)".to_owned(),
                ("ci", None) => "on the CI bridge (and jobs running `convoy-ci notify`)".to_owned(),
                _ => "on the conductor".to_owned(),
            };
            println!();
            println!("  # {} {place}", u.config);
            println!("  amqp_url = \"{}\"", u.amqp_url.as_deref().unwrap_or(""));
            if report.exchange != DEFAULT_EXCHANGE {
                println!("  exchange = \"{}\"", report.exchange);
            }
        }
    }
    if report.users.iter().any(|u| u.status == "kept") {
        println!();
        println!(
            "Users that existed kept their passwords, which are not shown; `--rotate` gives them \
             new ones, `--rotate web3,ci` only those named (then update their configs)."
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(hosts: &[&str]) -> SetupArgs {
        SetupArgs {
            amqp_url: DEFAULT_AMQP_URL.into(),
            vhost: None,
            exchange: None,
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            conductor_config: None,
            rotate: None,
            user_prefix: "convoy-".into(),
            broker_url: Some("amqps://mq.example.com:5671".into()),
            rabbitmqctl: "rabbitmqctl".into(),
            node: None,
            timeout: 60,
        }
    }

    #[test]
    fn plans_a_user_per_role_and_host() {
        let p = plan(&args(&["web1", "web2.dc1", "web1", " "])).unwrap();
        let users: Vec<String> = p.roles.iter().map(|r| r.user("convoy-")).collect();
        assert_eq!(
            users,
            [
                "convoy-conductor",
                "convoy-hook",
                "convoy-ci",
                "convoy-agent-web1",
                "convoy-fetcher-web1",
                "convoy-heartbeat-web1",
                "convoy-agent-web2.dc1",
                "convoy-fetcher-web2.dc1",
                "convoy-heartbeat-web2.dc1",
            ]
        );
        assert_eq!(p.vhost, "/");
        assert_eq!(
            p.public.with_credentials("u", "p").to_string(),
            "amqps://u:p@mq.example.com:5671/%2f"
        );
        let bad = plan(&args(&["web_1"])).map(|_| ()).unwrap_err();
        assert!(bad.0.contains("web_1"), "{bad}");
    }

    #[test]
    fn reads_hosts_from_the_conductor_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("conductor.toml");
        std::fs::write(
            &path,
            "exchange = \"fleet\"\n[apps.shop]\n[[apps.shop.stages]]\nname = \"staging\"\nhosts = [\"s1\"]\n\
             [[apps.shop.stages]]\nname = \"prod\"\nlabels = { role = \"web\" }\n\
             [[apps.shop.stages]]\nname = \"eu\"\nhosts = [\"p1\", \"p2\"]\n",
        )
        .unwrap();
        let (hosts, exchange) = read_conductor_config(&path).unwrap();
        assert_eq!(hosts, ["s1", "p1", "p2"]);
        assert_eq!(exchange.as_deref(), Some("fleet"));
        let mut a = args(&["s1", "x1"]);
        a.conductor_config = Some(path);
        let p = plan(&a).unwrap();
        assert_eq!(p.exchange, "fleet");
        assert_eq!(p.roles.len(), 3 + 3 * 4);
    }
}
