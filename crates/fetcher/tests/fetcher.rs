//! Real fetcher processes mirroring a real git repository, driven by push events.

mod common;

use common::{next_report, push_event};
use convoy_bus::{Bus, Consumer, Disposition, Incoming, Outgoing, Publisher, QueueSpec, Retry};
use convoy_message::{Body, FetchReport, FetchStatus};
use convoy_testkit::git::{self, git};
use convoy_testkit::{BrokerNode, Daemon, Tap, TestBus, wait_until};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

struct Origin {
    dir: tempfile::TempDir,
    bare: PathBuf,
    work: PathBuf,
}

impl Origin {
    fn new() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let bare = dir.path().join("web.git");
        git::init_bare(&bare)?;
        let work = dir.path().join("work");
        git::init(&work)?;
        git::commit_file(&work, "a.txt", "1", "first")?;
        git(
            &work,
            &["remote", "add", "origin", bare.to_str().unwrap_or_default()],
        )?;
        git(&work, &["push", "-q", "origin", "main"])?;
        Ok(Self { dir, bare, work })
    }

    fn commit_and_push(&self, n: usize) -> anyhow::Result<String> {
        let sha = git::commit_file(&self.work, "a.txt", &n.to_string(), &format!("c{n}"))?;
        git(&self.work, &["push", "-q", "origin", "main"])?;
        Ok(sha)
    }
}

fn start_fetcher(
    tb: &TestBus,
    origin: &Origin,
    host: &str,
    dir: &Path,
) -> anyhow::Result<(Daemon, PathBuf)> {
    let mirrors = dir.join(format!("mirrors-{host}"));
    let config = dir.join(format!("fetcher-{host}.toml"));
    std::fs::write(
        &config,
        format!(
            "host = \"{host}\"\nmirror_dir = \"{}\"\ndebounce_ms = 300\n[repos.web]\nurl = \"{}\"\n",
            mirrors.display(),
            origin.bare.display()
        ),
    )?;
    tb.track(format!("{}.fetcher.{host}", tb.exchange));
    // The fetcher runs convoy-git (beside it) for each fetch.
    convoy_testkit::workspace_bin("convoy-git", "convoy-git");
    let daemon = Daemon::spawn(
        &format!("fetcher-{host}"),
        Path::new(env!("CARGO_BIN_EXE_convoy-fetcher")),
        &["--config", &config.to_string_lossy()],
        &tb.env(),
        dir,
    )?;
    Ok((daemon, mirrors.join("web.git")))
}

/// Reports until every host in `hosts` answered all of `want`; returns each host's reports.
async fn collect_all(
    tap: &mut Tap,
    want: &HashSet<Uuid>,
    hosts: &[&str],
) -> anyhow::Result<HashMap<String, Vec<FetchReport>>> {
    let mut reports: HashMap<String, Vec<FetchReport>> = HashMap::new();
    let mut answered: HashMap<String, HashSet<Uuid>> = HashMap::new();
    while !hosts
        .iter()
        .all(|h| answered.get(*h).is_some_and(|a| want.is_subset(a)))
    {
        let r = next_report(tap, Duration::from_secs(60)).await?;
        let host = r.host.to_string();
        if r.status == FetchStatus::Fetched {
            answered
                .entry(host.clone())
                .or_default()
                .extend(r.for_events.iter().copied());
        }
        reports.entry(host).or_default().push(r);
    }
    Ok(reports)
}

async fn collect(
    tap: &mut Tap,
    want: &HashSet<Uuid>,
    host: &str,
) -> anyhow::Result<Vec<FetchReport>> {
    Ok(collect_all(tap, want, &[host])
        .await?
        .remove(host)
        .unwrap_or_default())
}

#[tokio::test]
async fn a_push_makes_every_fetcher_fetch_and_deleted_branches_are_pruned() -> anyhow::Result<()> {
    let tb = TestBus::new();
    let origin = Origin::new()?;
    let mut tap = tb.tap(&["fetch.web.*"]).await?;
    let (_a, mirror_a) = start_fetcher(&tb, &origin, "host-a", origin.dir.path())?;
    let (_b, mirror_b) = start_fetcher(&tb, &origin, "host-b", origin.dir.path())?;
    // Catch-up at start: both report the current main.
    let mut started = HashSet::new();
    while started.len() < 2 {
        let r = next_report(&mut tap, Duration::from_secs(30)).await?;
        assert_eq!(r.status, FetchStatus::Fetched, "{:?}", r.error);
        started.insert(r.host.to_string());
    }
    let publisher = Publisher::new(Bus::new(tb.config(), "test-hook")?);
    let sha = origin.commit_and_push(2)?;
    git(
        &origin.work,
        &["push", "-q", "origin", "main:refs/heads/feature"],
    )?;
    let event = push_event(&sha)?;
    publisher
        .publish(
            &Outgoing::message(&event)?,
            Retry::within(Duration::from_secs(20)),
        )
        .await?;
    let want: HashSet<Uuid> = [event.id].into();
    let all = collect_all(&mut tap, &want, &["host-a", "host-b"]).await?;
    for reports in all.values() {
        let last = reports.last().expect("a report");
        assert_eq!(last.refs["refs/heads/main"].as_str(), sha);
        assert!(last.refs.contains_key("refs/heads/feature"));
    }
    for mirror in [&mirror_a, &mirror_b] {
        assert_eq!(git::rev_parse(mirror, "refs/heads/main")?, sha);
    }
    // The branch is deleted on the origin: the next fetch prunes it.
    git(
        &origin.work,
        &["push", "-q", "origin", ":refs/heads/feature"],
    )?;
    let event = push_event(&sha)?;
    publisher
        .publish(
            &Outgoing::message(&event)?,
            Retry::within(Duration::from_secs(20)),
        )
        .await?;
    let want: HashSet<Uuid> = [event.id].into();
    let reports = collect(&mut tap, &want, "host-a").await?;
    assert!(
        !reports
            .last()
            .expect("report")
            .refs
            .contains_key("refs/heads/feature")
    );
    assert!(
        git(&mirror_a, &["show-ref"])?
            .lines()
            .all(|l| !l.ends_with("refs/heads/feature"))
    );
    Ok(())
}

#[tokio::test]
async fn a_burst_of_pushes_is_served_by_far_fewer_fetches() -> anyhow::Result<()> {
    let tb = TestBus::new();
    let origin = Origin::new()?;
    let mut tap = tb.tap(&["fetch.web.*"]).await?;
    let (_f, mirror) = start_fetcher(&tb, &origin, "host-a", origin.dir.path())?;
    next_report(&mut tap, Duration::from_secs(30)).await?; // catch-up
    let publisher = Publisher::new(Bus::new(tb.config(), "test-hook")?);
    let mut want = HashSet::new();
    let mut last = String::new();
    // Twenty pushes land on the origin, and their events arrive as a burst (a busy git
    // server announcing them back to back).
    let mut events = Vec::new();
    for n in 0..20 {
        last = origin.commit_and_push(n + 10)?;
        events.push(push_event(&last)?);
    }
    for event in &events {
        want.insert(event.id);
        publisher
            .publish(
                &Outgoing::message(event)?,
                Retry::within(Duration::from_secs(20)),
            )
            .await?;
    }
    let reports = collect(&mut tap, &want, "host-a").await?;
    assert!(
        reports.len() <= 6,
        "20 pushes took {} fetches",
        reports.len()
    );
    assert_eq!(git::rev_parse(&mirror, "refs/heads/main")?, last);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_during_a_burst_loses_no_push() -> anyhow::Result<()> {
    anyhow::ensure!(
        BrokerNode::available(),
        "needs a private RabbitMQ node: run scripts/test as root"
    );
    let mut node = BrokerNode::start().await?;
    let tb = TestBus::on(&node.url());
    let origin = Origin::new()?;
    // A durable queue and convoy's own consumer: reports survive the restart too.
    let bus = Bus::new(tb.config(), "test-conductor")?;
    let spec = QueueSpec::new(tb.queue("reports"), vec!["fetch.web.*".into()]);
    let consumer = Consumer::new(bus.clone(), spec);
    consumer.declare().await?;
    let answered: Arc<Mutex<HashSet<Uuid>>> = Arc::default();
    let reports = Arc::new(Mutex::new(0usize));
    let handler = {
        let answered = answered.clone();
        let reports = reports.clone();
        move |incoming: Incoming| {
            if let Body::Fetch(r) = &incoming.message.body
                && r.status == FetchStatus::Fetched
            {
                answered
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(r.for_events.iter().copied());
            }
            *reports.lock().unwrap_or_else(|p| p.into_inner()) += 1;
            async { Disposition::Ack }
        }
    };
    let cancel = CancellationToken::new();
    tokio::spawn({
        let cancel = cancel.clone();
        async move { consumer.run(&handler, cancel).await }
    });
    let (fetcher, mirror) = start_fetcher(&tb, &origin, "host-a", origin.dir.path())?;
    wait_until(Duration::from_secs(30), "the catch-up fetch", || {
        let n = *reports.lock().unwrap_or_else(|p| p.into_inner());
        async move { (n >= 1).then_some(()) }
    })
    .await?;
    let publisher = Publisher::new(bus.clone());
    let mut want = HashSet::new();
    let mut last = String::new();
    for n in 0..20 {
        if n == 10 {
            node.stop().await?;
            node.boot().await?;
        }
        last = origin.commit_and_push(n + 100)?;
        let event = push_event(&last)?;
        want.insert(event.id);
        publisher
            .publish(
                &Outgoing::message(&event)?,
                Retry::within(Duration::from_secs(60)),
            )
            .await?;
    }
    wait_until(
        Duration::from_secs(90),
        "every push answered by a fetch report",
        || {
            let done = want.is_subset(&answered.lock().unwrap_or_else(|p| p.into_inner()));
            async move { done.then_some(()) }
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", fetcher.log()))?;
    // Every event id must come back in a fetch report's for_events.
    let answered = answered.lock().map(|a| a.clone()).unwrap_or_default();
    assert!(
        want.is_subset(&answered),
        "unanswered: {:?}",
        want.difference(&answered).collect::<Vec<_>>()
    );
    assert_eq!(git::rev_parse(&mirror, "refs/heads/main")?, last);
    drop(fetcher);
    cancel.cancel();
    Ok(())
}

/// The `convoy-git` helpers a process has running (children named `convoy-git`).
fn helpers_of(parent: i32) -> Vec<i32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|p| p.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid = stat
                .rfind(')')
                .and_then(|i| stat[i + 2..].split_whitespace().nth(1))
                .and_then(|v| v.parse::<i32>().ok());
            stat.contains("(convoy-git)") && ppid == Some(parent)
        })
        .collect()
}

/// Whether `pid` still runs (a zombie waiting to be reaped has stopped).
fn runs(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with('Z')))
        .is_some_and(|zombie| !zombie)
}

/// A fetcher killed with SIGKILL mid-fetch takes its `convoy-git` helper with it: an orphan
/// must not go on writing into the mirror the next fetcher uses.
#[tokio::test]
async fn a_fetcher_killed_mid_fetch_takes_its_helper_with_it() -> anyhow::Result<()> {
    let tb = TestBus::new();
    let dir = tempfile::tempdir()?;
    // A git server that accepts and then says nothing: the fetch hangs in the helper.
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming().flatten() {
            held.push(conn);
        }
    });
    let toml = format!(
        "host = \"host-k\"\nmirror_dir = \"{}\"\n[repos.web]\nurl = \"http://127.0.0.1:{port}/web.git\"\n",
        dir.path().join("mirrors").display()
    );
    let (mut fetcher, _tap) = common::start_fetcher(&tb, dir.path(), "host-k", &toml, &[]).await?;
    let pid = fetcher
        .pid()
        .ok_or_else(|| anyhow::anyhow!("the fetcher has no pid"))?;
    let helper = wait_until(
        Duration::from_secs(20),
        "the catch-up fetch's helper",
        || {
            let found = helpers_of(pid).first().copied();
            async move { found }
        },
    )
    .await?;

    fetcher.kill9();
    let gone = wait_until(Duration::from_secs(10), "the helper to die", || {
        let dead = !runs(helper);
        async move { dead.then_some(()) }
    })
    .await;
    if gone.is_err() {
        // Do not leave it behind when the test fails.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(helper),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    gone.map_err(|e| anyhow::anyhow!("{e}: helper {helper} outlived its fetcher"))
}
