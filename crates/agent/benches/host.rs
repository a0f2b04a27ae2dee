//! Host daemons: idle cost of agent, fetcher and heartbeat, and command → result latency of
//! a deploy whose hooks do nothing. `cargo bench -p convoy-agent --bench host`; method in
//! docs/benchmarks.md.

use chrono::Utc;
use convoy_bus::{Bus, Outgoing, Publisher, Retry};
use convoy_message::names::{HostName, Name, RefName, ReleaseId, Sha};
use convoy_message::{Action, Body, Command, DeployOutcome, DeploySpec, KeyPair, routing};
use convoy_testkit::git::{self, git};
use convoy_testkit::{Daemon, TestBus};
use hdrhistogram::Histogram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Another workspace binary next to the agent's, built (or brought up to date) first.
fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let agent = PathBuf::from(env!("CARGO_BIN_EXE_convoy-agent"));
    let release = agent.to_string_lossy().contains("/release/");
    let mut cargo =
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cargo.args(["build", "--quiet", "-p", name]);
    if release {
        cargo.arg("--release");
    }
    anyhow::ensure!(cargo.status()?.success(), "building {name}");
    Ok(agent.with_file_name(name))
}

/// RSS KiB, CPU ticks, and context switches per thread id, of a process.
fn sample(pid: i32) -> (u64, u64, std::collections::HashMap<String, u64>) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rfind(')').map(|i| &stat[i + 2..]).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let mut switches = std::collections::HashMap::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let s = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            let n: u64 = s
                .lines()
                .filter(|l| {
                    l.starts_with("voluntary_ctxt_switches:")
                        || l.starts_with("nonvoluntary_ctxt_switches:")
                })
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum();
            switches.insert(t.file_name().to_string_lossy().into_owned(), n);
        }
    }
    (rss, ticks, switches)
}

/// Context switches during the window, over the threads alive at both ends (a thread that
/// started meanwhile counts from zero).
fn woken(
    before: &std::collections::HashMap<String, u64>,
    after: &std::collections::HashMap<String, u64>,
) -> u64 {
    after
        .iter()
        .map(|(tid, n)| n.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let idle_window = Duration::from_secs(30);
    let commands = 300usize;
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let origin = d.join("origin.git");
    git::init_bare(&origin)?;
    let work = d.join("work");
    git::init(&work)?;
    for i in 0..20 {
        std::fs::write(
            work.join(format!("file{i}.txt")),
            format!("content {i}\n").repeat(50),
        )?;
    }
    let sha = git::commit_file(&work, "README", "small app\n", "v1")?;
    git(&work, &["tag", "v1"])?;
    git(
        &work,
        &[
            "push",
            "-q",
            origin.to_str().unwrap_or_default(),
            "main",
            "--tags",
        ],
    )?;
    let mirrors = d.join("mirrors");
    std::fs::create_dir_all(&mirrors)?;
    git(
        d,
        &[
            "clone",
            "-q",
            "--mirror",
            origin.to_str().unwrap_or_default(),
            mirrors.join("web.git").to_str().unwrap_or_default(),
        ],
    )?;
    let keys = d.join("keys");
    std::fs::create_dir_all(&keys)?;
    let key = KeyPair::generate("bench")?;
    key.write_files(&keys)?;
    let tb = TestBus::new();
    let host = HostName::new("bench-host")?;
    tb.track(routing::queue::commands(&tb.exchange, &host));
    tb.track(routing::queue::fetcher(&tb.exchange, &host));
    std::fs::write(
        d.join("agent.toml"),
        format!(
            "host = \"{host}\"\nstate_dir = \"{}\"\nmirror_dir = \"{}\"\ntrusted_keys_dir = \"{}\"\nkeep_releases = 2\n[apps.web]\nroot = \"{}\"\n",
            d.join("state").display(),
            mirrors.display(),
            keys.display(),
            d.join("apps/web").display()
        ),
    )?;
    std::fs::write(
        d.join("fetcher.toml"),
        format!(
            "host = \"{host}\"\nmirror_dir = \"{}\"\n[repos.web]\nurl = \"{}\"\n",
            d.join("fetcher-mirrors").display(),
            origin.display()
        ),
    )?;
    std::fs::write(
        d.join("heartbeat.toml"),
        format!(
            "host = \"{host}\"\ninterval_s = 10\nagent_config = \"{}\"\n",
            d.join("agent.toml").display()
        ),
    )?;
    let cfg = |n: &str| d.join(n).to_string_lossy().to_string();
    let agent = Daemon::spawn(
        "agent",
        Path::new(env!("CARGO_BIN_EXE_convoy-agent")),
        &["--config", &cfg("agent.toml")],
        &tb.env(),
        d,
    )?;
    // Agent and fetcher run convoy-git, beside them, for their git work.
    sibling("convoy-git")?;
    let fetcher = Daemon::spawn(
        "fetcher",
        &sibling("convoy-fetcher")?,
        &["--config", &cfg("fetcher.toml")],
        &tb.env(),
        d,
    )?;
    let heartbeat = Daemon::spawn(
        "heartbeat",
        &sibling("convoy-heartbeat")?,
        &["--config", &cfg("heartbeat.toml")],
        &tb.env(),
        d,
    )?;

    // 1. Idle cost.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let daemons = [
        ("agent", &agent),
        ("fetcher", &fetcher),
        ("heartbeat", &heartbeat),
    ];
    let before: Vec<_> = daemons
        .iter()
        .map(|(_, p)| sample(p.pid().unwrap_or(0)))
        .collect();
    tokio::time::sleep(idle_window).await;
    let after: Vec<_> = daemons
        .iter()
        .map(|(_, p)| sample(p.pid().unwrap_or(0)))
        .collect();
    let tick_ms =
        1000.0 / nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as f64;
    println!("idle, {}s window after 5s warm-up:", idle_window.as_secs());
    for (i, (name, _)) in daemons.iter().enumerate() {
        let (rss, t0, s0) = &before[i];
        let (rss1, t1, s1) = &after[i];
        println!(
            "  {name:<10} RSS {:>5.1} MiB  CPU {:>4.0} ms  wake-ups {:>5.2}/s",
            *rss.max(rss1) as f64 / 1024.0,
            t1.saturating_sub(*t0) as f64 * tick_ms,
            woken(s0, s1) as f64 / idle_window.as_secs_f64()
        );
    }

    // 2. Command → result, hooks that do nothing.
    let publisher = Publisher::new(Bus::new(tb.config(), "bench")?);
    let mut tap = tb.tap(&["deploy.*.*.result"]).await?;
    let mut e2e = Histogram::<u64>::new(3)?;
    let mut inside = Histogram::<u64>::new(3)?;
    for n in 0..commands {
        let now = Utc::now();
        let command = Command {
            id: Uuid::now_v7(),
            host: host.clone(),
            issued_at: now,
            expires_at: now + chrono::Duration::minutes(5),
            issuer: "bench".into(),
            rollout: None,
            action: Action::Deploy(DeploySpec {
                app: Name::new("web")?,
                repo: Name::new("web")?,
                git_ref: RefName::new("refs/tags/v1")?,
                commit: Sha::new(sha.clone())?,
                release: ReleaseId::new(format!("r{n}"))?,
                no_switch: false,
            }),
        };
        let out = Outgoing::with_key(
            &key.command_message("bench", &command),
            routing::command(&host),
        )?;
        let t0 = Instant::now();
        publisher
            .publish(&out, Retry::within(Duration::from_secs(20)))
            .await?;
        loop {
            let tapped = tap.next(Duration::from_secs(30)).await?;
            if let Body::Result(r) = tapped.message()?.body
                && r.command_id == command.id
            {
                anyhow::ensure!(r.outcome == DeployOutcome::Succeeded, "{:?}", r.error);
                if n >= 20 {
                    e2e.record(t0.elapsed().as_micros() as u64)?;
                    inside.record(r.duration_ms * 1000)?;
                }
                break;
            }
        }
    }
    let ms = |us: u64| us as f64 / 1000.0;
    println!(
        "deploy command → result, no-op hooks, 21-file repo, {} samples:",
        commands - 20
    );
    println!(
        "  end to end (publish → result received)  p50 {:.2} ms  p99 {:.2} ms",
        ms(e2e.value_at_quantile(0.5)),
        ms(e2e.value_at_quantile(0.99))
    );
    println!(
        "  inside the agent (journal → result)     p50 {:.0} ms  p99 {:.0} ms (whole ms)",
        ms(inside.value_at_quantile(0.5)),
        ms(inside.value_at_quantile(0.99))
    );
    // The idle figure again, now that the agent has deployed 300 times: its git work ran in
    // helper processes, so nothing of it should have stayed behind.
    // (After tokio's 10 s keep-alive of idle blocking threads.)
    tokio::time::sleep(Duration::from_secs(12)).await;
    println!("after the deploys, idle again:");
    for (name, p) in &daemons[..1] {
        let pid = p.pid().unwrap_or(0);
        let (rss, _, _) = sample(pid);
        let rollup =
            std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
        let field = |key: &str| {
            rollup
                .lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0) as f64
                / 1024.0
        };
        println!(
            "  {name:<10} RSS {:>5.1} MiB (anonymous {:.1}, files {:.1})",
            rss as f64 / 1024.0,
            field("Anonymous:"),
            field("Rss:") - field("Anonymous:")
        );
    }
    Ok(())
}
