//! `convoy bus setup` against the real broker, each test in a virtual host of its own
//! (deleted at the end, with the users it made): each daemon's credentials do its own work
//! through the same bus client the daemons use, and get ACCESS_REFUSED for anything of
//! another host's — or of another daemon's on the same host. Needs root (rabbitmqctl):
//! scripts/test runs as root.

use convoy_bus::{
    Bus, BusConfig, Consumer, Disposition, Incoming, Outgoing, Publisher, QueueSpec, Retry,
};
use convoy_message::names::{HostName, Name};
use convoy_message::routing::{self, queue};
use convoy_message::{Body, Heartbeat, Message, Step};
use lapin::options::{BasicConsumeOptions, ExchangeDeleteOptions, QueueBindOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde_json::Value;
use std::process::Command;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const CONVOY: &str = env!("CARGO_BIN_EXE_convoy");
const EXCHANGE: &str = "convoy";

/// A virtual host and a user-name prefix of this test's own; both go when it ends.
struct Scratch {
    vhost: String,
    prefix: String,
}

impl Scratch {
    fn new() -> anyhow::Result<Self> {
        anyhow::ensure!(
            nix::unistd::geteuid().is_root(),
            "bus setup runs rabbitmqctl, which needs root: run scripts/test as root"
        );
        Ok(Self {
            vhost: convoy_testkit::unique("convoy-test"),
            prefix: format!("{}-", convoy_testkit::unique("t")),
        })
    }

    /// Runs `convoy --json bus setup` on this vhost; returns its report.
    fn setup(&self, extra: &[&str]) -> anyhow::Result<Value> {
        let out = self.setup_output(extra)?;
        anyhow::ensure!(
            out.status.success(),
            "bus setup failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    }
}

/// The node rabbitmqctl must reach: `CONVOY_TEST_RABBITMQ_NODE`, when the broker of
/// `CONVOY_TEST_AMQP_URL` is not the local default node.
fn node() -> Option<String> {
    std::env::var("CONVOY_TEST_RABBITMQ_NODE")
        .ok()
        .filter(|n| !n.is_empty())
}

fn rabbitmqctl() -> Command {
    let mut cmd = Command::new("rabbitmqctl");
    cmd.arg("-q");
    if let Some(node) = node() {
        cmd.args(["-n", &node]);
    }
    cmd
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let ctl = |args: &[&str]| rabbitmqctl().args(args).output();
        let _ = ctl(&["delete_vhost", &self.vhost]);
        if let Ok(out) = ctl(&["list_users", "--formatter", "json"]) {
            let users: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
            // All at once: each rabbitmqctl takes about half a second.
            let deleting: Vec<_> = users
                .iter()
                .filter_map(|u| u["user"].as_str())
                .filter(|n| n.starts_with(&self.prefix))
                .filter_map(|n| rabbitmqctl().args(["delete_user", n]).spawn().ok())
                .collect();
            for mut child in deleting {
                let _ = child.wait();
            }
        }
    }
}

/// The report's entry for `user`.
fn user<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["users"]
        .as_array()
        .and_then(|u| u.iter().find(|u| u["user"] == name))
        .unwrap_or(&Value::Null)
}

fn url_of(report: &Value, name: &str) -> String {
    user(report, name)["amqp_url"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn bus(url: &str, name: &str) -> anyhow::Result<Bus> {
    let mut config = BusConfig::new(url, EXCHANGE);
    // Generous: a loaded machine must not turn a slow answer into a wrong one.
    config.tuning.connect_timeout_ms = 10_000;
    config.tuning.confirm_timeout_ms = 10_000;
    config.tuning.max_backoff_ms = 500;
    Ok(Bus::new(config, name)?)
}

fn heartbeat(host: &str) -> Message {
    Message::new(
        format!("test@{host}"),
        Body::Heartbeat(Heartbeat {
            host: HostName::new(host).unwrap(),
            labels: Default::default(),
            versions: Default::default(),
            apps: Default::default(),
            load: [0.0; 3],
            disk_free_bytes: 0,
            interval_s: 10,
            started_at: chrono::Utc::now(),
        }),
    )
}

/// Publishes a message under `key` as the bus's user, once.
async fn publish(bus: &Bus, key: &str) -> anyhow::Result<()> {
    let out = Outgoing::with_key(&heartbeat("web-1"), key)?;
    // A publisher (channel) of its own: a refusal closes the channel.
    Publisher::new(bus.clone())
        .publish(&out, Retry::once())
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
}

fn refused(what: &str, result: anyhow::Result<()>) {
    match result {
        Ok(()) => panic!("{what}: allowed, but must be refused"),
        Err(e) => assert!(
            format!("{e:#}").contains("ACCESS_REFUSED"),
            "{what}: refused for another reason: {e:#}"
        ),
    }
}

/// Runs a consumer of `spec` until it hands over one message (or the timeout).
async fn receive_one(bus: Bus, spec: QueueSpec) -> anyhow::Result<Incoming> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let cancel = CancellationToken::new();
    let consumer = Consumer::new(bus, spec);
    let run = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let handler = move |incoming: Incoming| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(incoming);
                    Disposition::Ack
                }
            };
            consumer.run(&handler, cancel).await
        })
    };
    let got = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
    cancel.cancel();
    let _ = run.await;
    got.ok()
        .flatten()
        .ok_or_else(|| anyhow::anyhow!("nothing arrived within 10 s"))
}

/// One raw AMQP operation as `url`'s user on a fresh channel.
async fn raw<F, Fut>(url: &str, op: F) -> anyhow::Result<()>
where
    F: FnOnce(lapin::Channel) -> Fut,
    Fut: std::future::Future<Output = Result<(), lapin::Error>>,
{
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    let result = tokio::time::timeout(Duration::from_secs(5), op(channel)).await;
    let _ = conn.close(200, "done".into()).await;
    match result {
        Ok(r) => r.map_err(|e| anyhow::anyhow!("{e}")),
        Err(_) => anyhow::bail!("no answer within 5 s"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_daemon_does_its_own_work_and_nothing_of_another_hosts() -> anyhow::Result<()> {
    let scratch = Scratch::new()?;
    let report = scratch.setup(&["--hosts", "web-1,web-2"])?;
    let p = &scratch.prefix;
    let agent1 = url_of(&report, &format!("{p}agent-web-1"));
    let fetcher1 = url_of(&report, &format!("{p}fetcher-web-1"));
    let heartbeat1 = url_of(&report, &format!("{p}heartbeat-web-1"));
    let conductor = url_of(&report, &format!("{p}conductor"));
    let hook = url_of(&report, &format!("{p}hook"));
    let ci = url_of(&report, &format!("{p}ci"));
    assert!(agent1.contains(&format!("{p}agent-web-1:")), "{report:#}");
    let host1 = HostName::new("web-1")?;
    let host2 = HostName::new("web-2")?;
    let app = Name::new("shop")?;

    // What each does for a living.
    let agent_bus = bus(&agent1, "agent web-1")?;
    let fetcher_bus = bus(&fetcher1, "fetcher web-1")?;
    let heartbeat_bus = bus(&heartbeat1, "heartbeat web-1")?;
    let conductor_bus = bus(&conductor, "conductor")?;
    let hook_bus = bus(&hook, "hook")?;
    let ci_bus = bus(&ci, "ci")?;
    publish(&conductor_bus, &routing::command(&host1)).await?;
    let command = receive_one(agent_bus.clone(), QueueSpec::commands(EXCHANGE, &host1)).await?;
    assert_eq!(command.routing_key, "cmd.web-1");
    publish(&agent_bus, &routing::result(Some(&app), &host1)).await?;
    publish(&agent_bus, &routing::result(None, &host1)).await?;
    publish(&agent_bus, &routing::progress(&app, &host1, Step::Build)).await?;
    publish(&agent_bus, &routing::inventory(&host1)).await?;
    publish(&heartbeat_bus, &routing::heartbeat(&host1)).await?;
    let fetcher_queue = QueueSpec::fetcher(EXCHANGE, &host1, [&app]);
    Consumer::new(fetcher_bus.clone(), fetcher_queue.clone())
        .declare()
        .await?;
    publish(&hook_bus, &routing::push(&app)).await?;
    let push = receive_one(ci_bus.clone(), QueueSpec::ci(EXCHANGE)).await?;
    assert_eq!(push.routing_key, "push.shop");
    let fetched = receive_one(fetcher_bus.clone(), fetcher_queue).await?;
    assert_eq!(fetched.routing_key, "push.shop");
    publish(&fetcher_bus, &routing::fetch(&app, &host1)).await?;
    publish(&ci_bus, "build.shop.succeeded").await?;
    let event = receive_one(conductor_bus.clone(), QueueSpec::conductor_events(EXCHANGE)).await?;
    assert_eq!(event.routing_key, "deploy.shop.web-1.result");
    let step = receive_one(
        conductor_bus.clone(),
        QueueSpec::conductor_progress(EXCHANGE),
    )
    .await?;
    assert_eq!(step.routing_key, "deploy.shop.web-1.build");
    // The conductor takes the dead letters into its store: it may read their queue.
    raw(&conductor, |ch| async move {
        ch.basic_get(queue::dead(EXCHANGE).as_str().into(), Default::default())
            .await
            .map(drop)
    })
    .await
    .map_err(|e| anyhow::anyhow!("the conductor cannot read the dead letters: {e}"))?;

    // Another host's results, progress, heartbeats, commands: refused.
    for (what, bus, key) in [
        (
            "web-1's agent publishing web-2's result",
            &agent_bus,
            routing::result(Some(&app), &host2),
        ),
        (
            "web-1's agent publishing web-2's inventory result",
            &agent_bus,
            routing::result(None, &host2),
        ),
        (
            "web-1's agent publishing web-2's progress",
            &agent_bus,
            routing::progress(&app, &host2, Step::Switch),
        ),
        (
            "web-1's agent ordering web-2 to deploy",
            &agent_bus,
            routing::command(&host2),
        ),
        (
            "web-1's agent sending itself a command",
            &agent_bus,
            routing::command(&host1),
        ),
        (
            "web-1's agent announcing a push",
            &agent_bus,
            routing::push(&app),
        ),
        (
            "web-1's heartbeat speaking for web-2",
            &heartbeat_bus,
            routing::heartbeat(&host2),
        ),
        // Nor another daemon's work on the same host.
        (
            "web-1's heartbeat publishing a result",
            &heartbeat_bus,
            routing::result(Some(&app), &host1),
        ),
        (
            "web-1's fetcher reporting a deploy",
            &fetcher_bus,
            routing::result(Some(&app), &host1),
        ),
        (
            "web-1's fetcher reporting for web-2",
            &fetcher_bus,
            routing::fetch(&app, &host2),
        ),
        (
            "web-1's agent publishing a heartbeat",
            &agent_bus,
            routing::heartbeat(&host1),
        ),
        (
            "the hook sending a command",
            &hook_bus,
            routing::command(&host1),
        ),
        (
            "ci publishing a result",
            &ci_bus,
            routing::result(Some(&app), &host1),
        ),
        (
            "the conductor announcing a push",
            &conductor_bus,
            routing::push(&app),
        ),
    ] {
        refused(what, publish(bus, &key).await);
    }

    // Another host's queue, or another daemon's, directly.
    let cmd2 = queue::commands(EXCHANGE, &host2);
    let cmd1 = queue::commands(EXCHANGE, &host1);
    for (what, url, queue) in [
        (
            "web-1's agent consuming web-2's commands",
            &agent1,
            cmd2.clone(),
        ),
        (
            "web-1's fetcher consuming web-1's commands",
            &fetcher1,
            cmd1.clone(),
        ),
        (
            "web-1's heartbeat consuming web-1's commands",
            &heartbeat1,
            cmd1.clone(),
        ),
        (
            "web-1's agent reading the dead letters",
            &agent1,
            queue::dead(EXCHANGE),
        ),
        (
            "the hook reading the CI bridge's queue",
            &hook,
            queue::ci(EXCHANGE),
        ),
    ] {
        refused(
            what,
            raw(url, |ch| async move {
                ch.basic_consume(
                    queue.as_str().into(),
                    "thief".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map(drop)
            })
            .await,
        );
    }
    for (what, key) in [
        (
            "web-1's agent binding its queue to web-2's commands",
            "cmd.web-2",
        ),
        (
            "web-1's agent binding its queue to every result",
            "deploy.#",
        ),
        ("web-1's agent binding its queue to every command", "cmd.*"),
    ] {
        refused(
            what,
            raw(&agent1, |ch| {
                let q = cmd1.clone();
                async move {
                    ch.queue_bind(
                        q.as_str().into(),
                        EXCHANGE.into(),
                        key.into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                }
            })
            .await,
        );
    }
    refused(
        "web-1's agent publishing straight into web-2's queue (default exchange)",
        raw(&agent1, |ch| {
            let q = cmd2.clone();
            async move {
                // In confirm mode the refusal (which closes the channel) fails the pending
                // confirm with the broker's reason. A later round trip instead raced the
                // close and sometimes saw only "invalid channel state: Closed".
                ch.confirm_select(Default::default()).await?;
                ch.basic_publish(
                    "".into(),
                    q.as_str().into(),
                    Default::default(),
                    b"{}",
                    Default::default(),
                )
                .await?
                .await
                .map(drop)
            }
        })
        .await,
    );
    refused(
        "web-1's agent deleting web-2's command queue",
        raw(&agent1, |ch| {
            let q = cmd2.clone();
            async move {
                ch.queue_delete(q.as_str().into(), Default::default())
                    .await
                    .map(drop)
            }
        })
        .await,
    );
    refused(
        "web-1's agent deleting the exchange",
        raw(&agent1, |ch| async move {
            ch.exchange_delete(EXCHANGE.into(), ExchangeDeleteOptions::default())
                .await
        })
        .await,
    );
    for b in [
        agent_bus,
        fetcher_bus,
        heartbeat_bus,
        conductor_bus,
        hook_bus,
        ci_bus,
    ] {
        b.close().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_again_keeps_passwords_and_rotate_replaces_them() -> anyhow::Result<()> {
    let scratch = Scratch::new()?;
    let first = scratch.setup(&["--hosts", "db-1"])?;
    let name = format!("{}heartbeat-db-1", scratch.prefix);
    assert_eq!(user(&first, &name)["status"], "created");
    let old_url = url_of(&first, &name);

    let again = scratch.setup(&["--hosts", "db-1,db-2"])?;
    assert_eq!(user(&again, &name)["status"], "kept");
    assert_eq!(user(&again, &name)["permissions_set"], false);
    assert!(user(&again, &name)["password"].is_null());
    assert_eq!(
        user(&again, &format!("{}agent-db-2", scratch.prefix))["status"],
        "created"
    );
    // The kept password still works.
    publish(&bus(&old_url, "db-1")?, "heartbeat.db-1").await?;

    // Only the users named: db-2's three and the CI bridge's; db-1 and the conductor keep theirs.
    let some = scratch.setup(&["--hosts", "db-1,db-2", "--rotate", "db-2,ci"])?;
    let p = &scratch.prefix;
    for (who, status) in [
        (format!("{p}agent-db-2"), "rotated"),
        (format!("{p}fetcher-db-2"), "rotated"),
        (format!("{p}heartbeat-db-2"), "rotated"),
        (format!("{p}ci"), "rotated"),
        (name.clone(), "kept"),
        (format!("{p}conductor"), "kept"),
    ] {
        assert_eq!(user(&some, &who)["status"], status, "{who}");
    }
    publish(&bus(&old_url, "db-1")?, "heartbeat.db-1").await?;
    let out = Command::new(CONVOY)
        .args(["bus", "setup", "--hosts", "db-1", "--rotate", "db-9"])
        .output()?;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--rotate db-9: neither"),
        "{out:?}"
    );

    let rotated = scratch.setup(&["--hosts", "db-1", "--rotate"])?;
    assert_eq!(user(&rotated, &name)["status"], "rotated");
    let new_url = url_of(&rotated, &name);
    assert_ne!(new_url, old_url);
    publish(&bus(&new_url, "db-1")?, "heartbeat.db-1").await?;
    let old = Connection::connect(&old_url, ConnectionProperties::default()).await;
    assert!(old.is_err(), "the old password must no longer work");
    Ok(())
}

/// `url` (the shared broker's) with its virtual host replaced by `vhost`.
fn in_vhost(url: &str, vhost: &str) -> String {
    let host_end = url
        .find("://")
        .map(|i| i + 3)
        .and_then(|start| url[start..].find('/').map(|i| start + i))
        .unwrap_or(url.len());
    format!("{}/{vhost}", &url[..host_end])
}

/// The user name in an AMQP URL (`guest` when it names none).
fn user_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    match rest.split_once('@') {
        Some((userinfo, _)) => userinfo.split(':').next().unwrap_or("guest").to_owned(),
        None => "guest".to_owned(),
    }
}

/// The broker's view of one queue's `field` (`arguments`, `policy`), by `rabbitmqctl
/// list_queues`.
fn queue_info(vhost: &str, name: &str, field: &str) -> anyhow::Result<String> {
    let out = rabbitmqctl()
        .args([
            "list_queues",
            "-p",
            vhost,
            "name",
            field,
            "--formatter",
            "json",
        ])
        .output()?;
    let queues: Vec<Value> = serde_json::from_slice(&out.stdout)?;
    let q = queues
        .iter()
        .find(|q| q["name"] == name)
        .ok_or_else(|| anyhow::anyhow!("no queue {name} in {queues:?}"))?;
    Ok(q[field].to_string())
}

/// A new dead-letter queue carries its delivery limit as an argument (RabbitMQ 4 would drop
/// a letter after 20 deliveries otherwise); one an earlier convoy made without it is kept —
/// its arguments cannot change — and gets the limit from a policy, and bus setup does not
/// fail on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dead_letter_queue_never_drops_a_letter_new_or_old() -> anyhow::Result<()> {
    let limit = convoy_bus::topology::DEAD_QUEUE_DELIVERY_LIMIT.to_string();
    let dead = queue::dead(EXCHANGE);

    let fresh = Scratch::new()?;
    let report = fresh.setup(&["--hosts", "db-1"])?;
    assert_eq!(report["dead_letter_limit"], "argument", "{report}");
    let args = queue_info(&fresh.vhost, &dead, "arguments")?;
    assert!(
        args.contains("x-delivery-limit") && args.contains(&limit),
        "{args}"
    );

    // An installation from before the limit: the queue exists without it.
    let old = Scratch::new()?;
    old.dead_queue_made_with(&[]).await?;
    for _ in 0..2 {
        let report = old.setup(&["--hosts", "db-1"])?;
        let policy = format!("convoy-dead-letters.{EXCHANGE}");
        assert_eq!(
            report["dead_letter_limit"],
            format!("policy {policy}"),
            "{report}"
        );
        let out = rabbitmqctl()
            .args(["list_policies", "-p", &old.vhost, "--formatter", "json"])
            .output()?;
        let policies: Vec<Value> = serde_json::from_slice(&out.stdout)?;
        let p = policies
            .iter()
            .find(|p| p["name"] == policy.as_str())
            .ok_or_else(|| anyhow::anyhow!("no policy {policy}: {policies:?}"))?;
        assert!(p["definition"].to_string().contains(&limit), "{p}");
        assert_eq!(
            p["pattern"],
            format!("^{}$", dead.replace('.', "\\.")),
            "{p}"
        );
        assert!(!queue_info(&old.vhost, &dead, "arguments")?.contains("x-delivery-limit"));
        // The broker applies it to that queue.
        assert_eq!(
            queue_info(&old.vhost, &dead, "policy")?,
            format!("\"{policy}\"")
        );
    }

    // One somebody changed (here: a length limit, which drops letters): kept, but bus
    // setup stops and says what to do rather than paper over it with a policy.
    let changed = Scratch::new()?;
    changed
        .dead_queue_made_with(&[("x-max-length", 10)])
        .await?;
    let out = changed.setup_output(&["--hosts", "db-1"])?;
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("exists with other properties") && stderr.contains("x-max-length"),
        "{stderr}"
    );
    Ok(())
}

impl Scratch {
    /// Runs `convoy --json bus setup` on this vhost, whatever comes of it.
    fn setup_output(&self, extra: &[&str]) -> anyhow::Result<std::process::Output> {
        let mut cmd = Command::new(CONVOY);
        cmd.env_remove("CONVOY_EXCHANGE")
            .args(["--json", "bus", "setup", "--amqp-url"])
            .arg(convoy_testkit::shared_amqp_url())
            .args(["--vhost", &self.vhost, "--user-prefix", &self.prefix]);
        if let Some(node) = node() {
            cmd.args(["--node", &node]);
        }
        Ok(cmd.args(extra).output()?)
    }

    /// Makes this test's vhost and in it the dead-letter queue as convoy made it before its
    /// delivery limit (durable, quorum), plus `extra` integer arguments.
    async fn dead_queue_made_with(&self, extra: &[(&str, i32)]) -> anyhow::Result<()> {
        let ctl = |args: &[&str]| -> anyhow::Result<()> {
            let out = rabbitmqctl().args(args).output()?;
            anyhow::ensure!(out.status.success(), "rabbitmqctl {args:?}: {out:?}");
            Ok(())
        };
        ctl(&["add_vhost", &self.vhost])?;
        let shared = convoy_testkit::shared_amqp_url();
        let admin = user_of(&shared);
        ctl(&[
            "set_permissions",
            "-p",
            &self.vhost,
            &admin,
            ".*",
            ".*",
            ".*",
        ])?;
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            lapin::types::AMQPValue::LongString("quorum".into()),
        );
        for (k, v) in extra {
            args.insert((*k).into(), lapin::types::AMQPValue::LongInt(*v));
        }
        let url = in_vhost(&shared, &self.vhost);
        raw(&url, |ch| async move {
            ch.queue_declare(
                queue::dead(EXCHANGE).as_str().into(),
                lapin::options::QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await
            .map(drop)
        })
        .await
    }
}
