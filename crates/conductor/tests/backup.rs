//! `convoy-conductor backup`: a copy of the store taken while a real conductor runs a
//! rollout, restored into a fresh data directory, read by a new conductor.

mod common;

use common::{Fleet, Setup, text};
use serde_json::json;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

/// Runs `convoy-conductor --config CONFIG backup DEST`.
async fn backup(config: &Path, dest: &Path) -> anyhow::Result<Output> {
    let (config, dest) = (config.to_owned(), dest.to_owned());
    Ok(tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_convoy-conductor"))
            .arg("--config")
            .arg(&config)
            .arg("backup")
            .arg(&dest)
            .output()
    })
    .await??)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_mid_rollout_restores_into_a_fresh_data_dir() -> anyhow::Result<()> {
    let mut fleet = Fleet::new(Setup {
        hosts: 3,
        build_sleep: 0.8,
        ..Setup::default()
    })
    .await?;
    fleet.start_conductor().await?;
    fleet.start_agents()?;

    // History: v1 everywhere.
    fleet.release("v1")?;
    fleet.wait_ref("v1").await?;
    let first = fleet.deploy("v1", "prod", json!({ "batches": 3 }))?;
    fleet
        .wait_state(first, &["succeeded"], Duration::from_secs(60))
        .await?;

    // v2 host by host; the backup is taken while the conductor is in the middle of it.
    fleet.release("v2")?;
    fleet.wait_ref("v2").await?;
    let second = fleet.deploy("v2", "prod", json!({ "batches": 1 }))?;
    let release = fleet.wait_partway(second, 1).await?["release"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let dest = fleet.path().join("backups/conductor.db");
    std::fs::create_dir_all(fleet.path().join("backups"))?;
    let out = backup(&fleet.conductor_config, &dest).await?;
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("integrity_check ok"), "{stdout}");
    assert!(stdout.contains("2 rollouts"), "{stdout}");

    // The copy is one self-contained file, as of a moment mid-rollout.
    {
        let db = rusqlite::Connection::open(&dest)?;
        let mode: String = db.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
        assert_eq!(mode, "delete");
        let state: String =
            db.query_row("SELECT state FROM rollouts WHERE id = ?1", [second], |r| {
                r.get(0)
            })?;
        assert_eq!(state, "running", "the backup was not taken mid-rollout");
    }
    assert!(
        !dest.with_file_name("conductor.db-wal").exists(),
        "a -wal file beside the backup"
    );

    // The live store itself, and a directory that is not there, are refused by name.
    let live = fleet.path().join("conductor/conductor.db");
    let out = backup(&fleet.conductor_config, &live).await?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is the live store itself"),
        "{}",
        text(&out)
    );
    let missing = fleet.path().join("no-such-dir/conductor.db");
    let out = backup(&fleet.conductor_config, &missing).await?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&missing.display().to_string()),
        "{}",
        text(&out)
    );

    // The original conductor finishes v2, then goes away with its data directory.
    fleet
        .wait_state(second, &["succeeded"], Duration::from_secs(60))
        .await?;
    if let Some(c) = fleet.conductor.as_mut() {
        c.terminate(Duration::from_secs(20)).await?;
    }
    std::fs::rename(
        fleet.path().join("conductor"),
        fleet.path().join("conductor.lost"),
    )?;

    // Restore: the backup as conductor.db of a fresh state_dir, and a new conductor on it.
    let fresh = fleet.path().join("restored");
    std::fs::create_dir_all(&fresh)?;
    std::fs::copy(&dest, fresh.join("conductor.db"))?;
    let config = std::fs::read_to_string(&fleet.conductor_config)?;
    let old_state = format!(
        "state_dir = \"{}\"",
        fleet.path().join("conductor").display()
    );
    anyhow::ensure!(config.contains(&old_state), "no state_dir line in {config}");
    std::fs::write(
        &fleet.conductor_config,
        config.replace(&old_state, &format!("state_dir = \"{}\"", fresh.display())),
    )?;
    fleet.start_conductor().await?;

    // It sees the history: v1 done, and v2 as the backup left it, which it resumes.
    let history = fleet.get("/api/rollouts?app=web")?;
    let ids: Vec<i64> = history
        .as_array()
        .map(|a| a.iter().filter_map(|r| r["id"].as_i64()).collect())
        .unwrap_or_default();
    assert_eq!(ids, vec![second, first], "{history}");
    let r1 = fleet.get(&format!("/api/rollouts/{first}"))?;
    assert_eq!(r1["state"], "succeeded");
    assert_eq!(r1["summary"]["counts"]["succeeded"], 3, "{}", r1["summary"]);
    assert_eq!(
        r1["results"].as_array().map(Vec::len),
        Some(3),
        "the agents' results of v1 are in the restored store"
    );
    let audit = fleet.get("/api/audit")?;
    assert!(
        audit
            .as_array()
            .is_some_and(|a| a.iter().filter(|l| l["action"] == "deploy").count() == 2),
        "{audit}"
    );

    // Commands the backup holds are sent again with the same ids and answered from the
    // agents' journals; hosts it had not reached yet get a new command for a release they
    // already run. No host builds v2 twice.
    let r2 = fleet
        .wait_state(second, &["succeeded"], Duration::from_secs(60))
        .await?;
    assert_eq!(r2["summary"]["counts"]["succeeded"], 3, "{}", r2["summary"]);
    assert!(
        fleet.conductor_log().contains("resuming rollout"),
        "{}",
        fleet.conductor_log()
    );
    for h in &fleet.hosts {
        assert_eq!(h.current().as_deref(), Some(release.as_str()), "{}", h.name);
        assert_eq!(
            h.builds_of(&release),
            1,
            "{} built {release} again after the restore",
            h.name
        );
    }
    Ok(())
}
