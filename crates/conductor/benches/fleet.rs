//! The conductor at scale. `cargo bench -p convoy-conductor --bench fleet [-- rollout|heartbeats]`;
//! method and figures in docs/benchmarks.md.
//!
//! - `rollout`: 100 real agent processes (hooks that only append a line), batches of 10;
//!   the orchestration overhead of each batch beyond the agents' own time, and the whole
//!   rollout. `serial`: the same with 20 agents one at a time (no agents sharing the cores).
//! - `heartbeats`: 50,000 simulated hosts heartbeating every 10 s (5,000 messages/s) into a
//!   conductor for 30 s; its CPU and memory.

#[path = "../tests/common/mod.rs"]
mod common;

use chrono::{DateTime, Utc};
use common::{Fleet, Setup};
use convoy_bus::{Bus, Outgoing, Publisher};
use convoy_message::names::HostName;
use convoy_message::{Body, Heartbeat, Message};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn time(v: &Value) -> Option<DateTime<Utc>> {
    v.as_str()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
}

/// Every `*.log` below `dir`.
fn walk_logs(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk_logs(&path));
        } else if path.extension().is_some_and(|e| e == "log") {
            out.push(path);
        }
    }
    out
}

/// The result of `host`'s command in rollout `r`.
fn result_of<'a>(r: &'a Value, host: &Value) -> Option<&'a Value> {
    r["results"]
        .as_array()?
        .iter()
        .find(|res| res["command_id"] == host["command"])
}

/// An agent's own time for a command, from its result: `started_at` to `finished_at`
/// (microseconds), else the whole-millisecond `duration_ms`.
fn own_ms(res: &Value) -> Option<f64> {
    match (time(&res["started_at"]), time(&res["finished_at"])) {
        (Some(s), Some(f)) => Some((f - s).num_microseconds().unwrap_or(0) as f64 / 1000.0),
        _ => res["duration_ms"].as_u64().map(|ms| ms as f64),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// A rollout of `hosts` agents in batches of `batch`.
async fn rollout(hosts: usize, batch: usize) -> anyhow::Result<()> {
    let mut fleet = Fleet::new(Setup {
        hosts,
        ..Setup::default()
    })
    .await?;
    fleet.start_with("v1").await?;
    // Warm-up: every agent has started, declared its queue and exported once.
    let warm = fleet.deploy(
        "v1",
        "prod",
        json!({ "batches": [hosts], "host_deadline_s": 300 }),
    )?;
    fleet
        .wait_state(warm, &["succeeded"], Duration::from_secs(300))
        .await?;
    fleet.release("v2")?;
    fleet.wait_ref("v2").await?;
    let started = Instant::now();
    let id = fleet.deploy(
        "v2",
        "prod",
        json!({ "batches": [batch], "host_deadline_s": 300 }),
    )?;
    let r = fleet
        .wait_state(id, &["succeeded"], Duration::from_secs(300))
        .await?;
    let observed = started.elapsed();
    let hosts_v = r["hosts"].as_array().cloned().unwrap_or_default();
    let batches = r["batches"].as_u64().unwrap_or(0) as usize;
    let mut overhead = Vec::new();
    let mut gaps = Vec::new();
    let mut inside = Vec::new();
    let mut prev_end: Option<DateTime<Utc>> = None;
    for b in 0..batches {
        let of: Vec<&Value> = hosts_v.iter().filter(|h| h["batch"] == b).collect();
        let sent = of.iter().filter_map(|h| time(&h["sent_at"])).min();
        let done = of.iter().filter_map(|h| time(&h["finished_at"])).max();
        let agent_ms = of
            .iter()
            .filter_map(|h| result_of(&r, h).and_then(own_ms))
            .fold(0.0, f64::max);
        if let (Some(s), Some(d)) = (sent, done) {
            let span = (d - s).num_microseconds().unwrap_or(0) as f64 / 1000.0;
            overhead.push(span - agent_ms);
            inside.push(agent_ms);
            if let Some(p) = prev_end {
                gaps.push((s - p).num_microseconds().unwrap_or(0) as f64 / 1000.0);
            }
            prev_end = Some(d);
        }
    }
    // Each host's path, from the agent's own start time: conductor → agent (commit,
    // publish, broker, the agent's verify and journal) and agent → conductor (the result's
    // publish, broker, the conductor's commit).
    let mut out_ms = Vec::new();
    let mut back_ms = Vec::new();
    for res in r["results"].as_array().into_iter().flatten() {
        let Some(host) = hosts_v.iter().find(|h| h["command"] == res["command_id"]) else {
            continue;
        };
        if let (Some(sent), Some(start), Some(done), Some(ms)) = (
            time(&host["sent_at"]),
            time(&res["started_at"]),
            time(&host["finished_at"]),
            own_ms(res),
        ) {
            out_ms.push((start - sent).num_microseconds().unwrap_or(0) as f64 / 1000.0);
            let end = start + chrono::Duration::microseconds((ms * 1000.0) as i64);
            back_ms.push((done - end).num_microseconds().unwrap_or(0) as f64 / 1000.0);
        }
    }
    // CONVOY_BENCH_LOGS=<dir>: keep every daemon's log and each host's timeline there
    // (the agents' log lines carry microsecond timestamps to line up with these).
    if let Ok(keep) = std::env::var("CONVOY_BENCH_LOGS") {
        let keep = std::path::PathBuf::from(keep);
        std::fs::create_dir_all(&keep)?;
        let mut timeline = String::new();
        for h in &hosts_v {
            let res = result_of(&r, h);
            timeline.push_str(&format!(
                "{} batch={} sent={} started={} duration_ms={} agent_finished={} finished={}\n",
                h["host"],
                h["batch"],
                h["sent_at"],
                res.map(|x| x["started_at"].clone()).unwrap_or_default(),
                res.map(|x| x["duration_ms"].clone()).unwrap_or_default(),
                res.map(|x| x["finished_at"].clone()).unwrap_or_default(),
                h["finished_at"],
            ));
        }
        std::fs::write(keep.join("timeline.txt"), timeline)?;
        for entry in walk_logs(fleet.path()) {
            let name = entry
                .strip_prefix(fleet.path())
                .map(|p| p.to_string_lossy().replace('/', "_"))
                .unwrap_or_default();
            std::fs::copy(&entry, keep.join(name))?;
        }
    }
    let whole = (time(&r["finished_at"]).unwrap_or_default()
        - time(&r["created_at"]).unwrap_or_default())
    .num_milliseconds();
    println!("rollout of {hosts} agents in {batches} batches of {batch}:");
    println!(
        "  whole rollout (created → finished): {whole} ms (observed by the client: {} ms)",
        observed.as_millis()
    );
    println!(
        "  per batch, slowest agent's own time (median): {:.1} ms",
        median(inside)
    );
    println!(
        "  per batch, orchestration beyond the agents' time (median): {:.1} ms",
        median(overhead.clone())
    );
    println!(
        "  per batch, orchestration (max): {:.1} ms",
        overhead.iter().cloned().fold(0.0, f64::max)
    );
    println!(
        "  last result of a batch → first command of the next (median): {:.1} ms",
        median(gaps)
    );
    println!(
        "  per host, command sent → agent starts (median / max): {:.1} / {:.1} ms",
        median(out_ms.clone()),
        out_ms.iter().cloned().fold(0.0, f64::max)
    );
    println!(
        "  per host, agent done → result recorded (median / max): {:.1} / {:.1} ms",
        median(back_ms.clone()),
        back_ms.iter().cloned().fold(0.0, f64::max)
    );
    Ok(())
}

fn proc_sample(pid: i32) -> (u64, f64) {
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
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    (rss, ticks as f64 / hz)
}

async fn heartbeats() -> anyhow::Result<()> {
    let hosts = 50_000usize;
    let interval = 10u32;
    let seconds = 30u64;
    let mut fleet = Fleet::new(Setup {
        hosts: 1,
        ..Setup::default()
    })
    .await?;
    fleet.start_conductor().await?;
    let pid = fleet.conductor.as_ref().and_then(|d| d.pid()).unwrap_or(0);
    let publisher = Arc::new(Publisher::new(Bus::new(
        fleet.tb.config(),
        "bench-heartbeats",
    )?));
    let names: Vec<HostName> = (0..hosts)
        .map(|i| HostName::new(format!("sim-{i:05}")))
        .collect::<Result<_, _>>()?;
    let started_at = Utc::now();
    let rate = hosts as u64 / u64::from(interval);
    let (rss0, cpu0) = proc_sample(pid);
    let t0 = Instant::now();
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut in_flight = tokio::task::JoinSet::new();
    while t0.elapsed() < Duration::from_secs(seconds) {
        tick.tick().await;
        let due = (t0.elapsed().as_secs_f64() * rate as f64) as u64;
        while sent < due {
            let host = names[(sent as usize) % hosts].clone();
            let beat = Message::new(
                format!("heartbeat@{host}"),
                Body::Heartbeat(Heartbeat {
                    host,
                    labels: [("role".to_owned(), "web".to_owned())].into(),
                    versions: [("convoy-heartbeat".to_owned(), "0.1.0".to_owned())].into(),
                    apps: Default::default(),
                    load: [0.1, 0.2, 0.3],
                    disk_free_bytes: 1 << 34,
                    interval_s: interval,
                    started_at,
                }),
            );
            let out = Outgoing::message(&beat)?;
            let p = publisher.clone();
            in_flight.spawn(async move { p.publish_once(&out).await.is_ok() });
            sent += 1;
            while in_flight.len() > 2000 {
                in_flight.join_next().await;
            }
        }
        while in_flight.try_join_next().is_some() {}
    }
    while in_flight.join_next().await.is_some() {}
    let published = t0.elapsed();
    // Let the conductor drain its queue, then sample.
    let metrics_url = format!("{}/metrics", fleet.url());
    let mut last = 0u64;
    for _ in 0..600 {
        let text = ureq::get(&metrics_url)
            .call()?
            .body_mut()
            .read_to_string()?;
        let n: u64 = text
            .lines()
            .find(|l| l.starts_with("convoy_heartbeats_total"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if n >= sent || (n == last && n > 0) {
            last = n;
            break;
        }
        last = n;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let wall = t0.elapsed().as_secs_f64();
    let (rss1, cpu1) = proc_sample(pid);
    let metrics = ureq::get(&metrics_url)
        .call()?
        .body_mut()
        .read_to_string()?;
    let known: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("convoy_hosts{"))
        .filter_map(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum();
    println!("{hosts} simulated hosts heartbeating every {interval} s ({rate}/s) for {seconds} s:");
    println!(
        "  published {sent} in {:.1} s; conductor handled {last}",
        published.as_secs_f64()
    );
    println!("  hosts in the fleet view: {known}");
    println!(
        "  conductor CPU: {:.2} core(s) over {wall:.1} s ({:.1} CPU-s)",
        (cpu1 - cpu0) / wall,
        cpu1 - cpu0
    );
    println!(
        "  conductor RSS: {} MiB before, {} MiB after",
        rss0 / 1024,
        rss1 / 1024
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let which: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    common::build_siblings()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        if which.is_empty() || which.iter().any(|w| w == "rollout") {
            rollout(100, 10).await?;
        }
        // The same with one host per batch: no agents competing for the two cores, so the
        // per-batch figure is the orchestration floor on this machine.
        if which.is_empty() || which.iter().any(|w| w == "serial") {
            rollout(20, 1).await?;
        }
        if which.is_empty() || which.iter().any(|w| w == "heartbeats") {
            heartbeats().await?;
        }
        Ok(())
    })
}
