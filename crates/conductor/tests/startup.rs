//! A conductor whose engine cannot load the store stops at once, with the error and a
//! status systemd does not restart into, instead of serving an API that refuses every change.

mod common;

use common::{Fleet, Setup};
use convoy_testkit::Daemon;
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_record_it_cannot_read_stops_the_conductor_with_status_65() -> anyhow::Result<()>
{
    let mut fleet = Fleet::new(Setup {
        hosts: 1,
        ..Setup::default()
    })
    .await?;
    // A real unfinished rollout: no agent runs, so its host never answers.
    fleet.start_conductor().await?;
    fleet.release("v1")?;
    fleet.wait_ref("v1").await?;
    let id = fleet.deploy("v1", "prod", json!({}))?;
    if let Some(c) = fleet.conductor.as_mut() {
        let status = c.terminate(Duration::from_secs(20)).await?;
        anyhow::ensure!(status.success(), "{status}: {}", c.log());
    }

    // Its record is damaged (a torn write, a hand edit, a newer conductor's format).
    let db = fleet.path().join("conductor/conductor.db");
    let conn = rusqlite::Connection::open(&db)?;
    let changed = conn.execute(
        "UPDATE rollouts SET body = substr(body, 1, 40) WHERE id = ?1",
        [id],
    )?;
    anyhow::ensure!(changed == 1, "rollout {id} not in the store");
    drop(conn);

    let started = Instant::now();
    let (status, log) = run_to_exit(&fleet, "conductor-damaged", &fleet.tb.env()).await?;
    assert_eq!(status.code(), Some(65), "{log}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    let expected = format!(
        "convoy-conductor: the engine cannot load the store: the conductor's store holds a record it cannot read (rollout {id}): EOF"
    );
    assert!(log.contains(&expected), "{expected}\n{log}");
    // The cause once, not repeated as the error's source.
    let line = log
        .lines()
        .find(|l| l.contains(&expected))
        .unwrap_or_default();
    assert_eq!(line.matches("EOF while parsing").count(), 1, "{line}");
    assert!(log.contains("restore a backup"), "{log}");
    // It no longer serves.
    let api = std::net::TcpStream::connect(("127.0.0.1", fleet.port));
    assert!(api.is_err(), "the API still listens:\n{log}");
    Ok(())
}

/// `--check-config` checks the file and the signing key without starting; a broker URL
/// that does not parse stops a starting conductor with 78 (not restarted in a loop) too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_and_a_bad_broker_url_answer_with_status_78() -> anyhow::Result<()> {
    let fleet = Fleet::new(Setup {
        hosts: 1,
        ..Setup::default()
    })
    .await?;
    let path = fleet.conductor_config.clone();
    let check = |config: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_convoy-conductor"))
            .args(["--config", &config.to_string_lossy(), "--check-config"])
            .env_clear()
            .output()
    };
    let out = check(&path)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains("configuration is valid (1 apps"),
        "{stdout}"
    );

    // The signing key moved away: the check names the key and the fix.
    let text = std::fs::read_to_string(&path)?;
    let broken = fleet.path().join("broken.toml");
    let line = text
        .lines()
        .find(|l| l.starts_with("signing_key"))
        .ok_or_else(|| anyhow::anyhow!("no signing_key line in\n{text}"))?;
    std::fs::write(
        &broken,
        text.replace(line, "signing_key = \"/nonexistent/conductor.key\""),
    )?;
    let out = check(&broken)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("signing_key") && stderr.contains("convoy keygen"),
        "{stderr}"
    );

    let mut env = fleet.tb.env();
    env.push((
        "CONVOY_AMQP_URL".into(),
        "amqp://guest:guest@127.0.0.1:no-port/%2f".into(),
    ));
    let (status, log) = run_to_exit(&fleet, "conductor-bad-url", &env).await?;
    assert_eq!(status.code(), Some(78), "{log}");
    assert!(log.contains("invalid amqp_url"), "{log}");
    Ok(())
}

/// Starts a conductor on the fleet's configuration with `env` and waits (20 s at most) for
/// it to stop by itself: its exit status and its log.
async fn run_to_exit(
    fleet: &Fleet,
    name: &str,
    env: &[(String, String)],
) -> anyhow::Result<(std::process::ExitStatus, String)> {
    let config = fleet.conductor_config.to_string_lossy().into_owned();
    let mut conductor = Daemon::spawn(
        name,
        Path::new(env!("CARGO_BIN_EXE_convoy-conductor")),
        &["--config", &config],
        env,
        fleet.path(),
    )?;
    let status = conductor.wait(Duration::from_secs(20)).await;
    let log = conductor.log();
    let status = status.map_err(|e| anyhow::anyhow!("{e}\n{log}"))?;
    Ok((status, log))
}
