//! What one dispatch commit costs the conductor's store, alone: the rollout saved and one
//! signed command inserted, in one transaction (WAL, `synchronous = FULL`), as the engine
//! does before a command leaves.
//!
//! ```sh
//! cargo run --release -p convoy-conductor --example store_commit -- [HOSTS] [IDLE_MS]
//! ```
//!
//! `HOSTS` (default 20) sizes the rollout; `IDLE_MS` (default 0) pauses between commits, as
//! a rollout does while agents work: after a pause the same commit costs several times more
//! on a virtual machine (docs/benchmarks.md). The store is a temporary file under `/tmp`.

use chrono::Utc;
use convoy_conductor::rollout::{Rollout, RolloutKind, RolloutSpec};
use convoy_conductor::store::Store;
use convoy_message::names::{HostName, Name, RefName, ReleaseId, Sha};
use std::time::{Duration, Instant};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let hosts: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(20);
    let idle = Duration::from_millis(args.next().map(|s| s.parse()).transpose()?.unwrap_or(0));
    let rounds = if idle.is_zero() { 2000 } else { 400 };

    let dir = tempfile::tempdir_in("/tmp")?;
    let mut store = Store::open(&dir.path().join("conductor.db"))?;
    let spec = RolloutSpec {
        app: Name::new("web")?,
        stage: "prod".into(),
        repo: Name::new("web")?,
        kind: RolloutKind::Deploy,
        git_ref: Some(RefName::new("refs/tags/v1")?),
        commit: Some(Sha::new("a".repeat(40))?),
        release: ReleaseId::new("r1")?,
        strategy: Default::default(),
        started_by: "bench".into(),
        pipeline: None,
    };
    let names = (0..hosts)
        .map(|i| HostName::new(format!("host-{i:04}")))
        .collect::<Result<_, _>>()?;
    let mut rollout = Rollout::new(0, spec, names, Utc::now());
    store.write(|tx| tx.insert_rollout(&mut rollout))?;
    let _ = rollout.tick(Utc::now());
    let command = vec![b'x'; 900];

    let mut took = Vec::with_capacity(rounds);
    for i in 0..rounds {
        std::thread::sleep(idle);
        let t = Instant::now();
        store.write(|tx| {
            tx.save_rollout(&rollout)?;
            tx.insert_command(
                uuid::Uuid::now_v7(),
                Some(rollout.id),
                "host-0001",
                &command,
            )
        })?;
        took.push(t.elapsed().as_secs_f64() * 1e3);
        if i % 100 == 99 {
            store.checkpoint()?;
        }
    }
    took.sort_by(f64::total_cmp);
    println!(
        "{hosts} hosts ({} B of rollout JSON), {rounds} commits {} ms apart: median {:.3} ms, p90 {:.3} ms",
        serde_json::to_string(&rollout)?.len(),
        idle.as_millis(),
        took[took.len() / 2],
        took[took.len() * 9 / 10],
    );
    Ok(())
}
