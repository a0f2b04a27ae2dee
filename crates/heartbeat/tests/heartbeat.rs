//! A real heartbeat process publishes its host, labels and the releases on disk.

use convoy_message::Body;
use convoy_testkit::{Daemon, TestBus};
use std::path::Path;
use std::time::Duration;

#[tokio::test]
async fn heartbeats_carry_labels_and_current_releases() -> anyhow::Result<()> {
    let tb = TestBus::new();
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("apps/web");
    std::fs::create_dir_all(root.join("releases/r1"))?;
    std::os::unix::fs::symlink("releases/r1", root.join("current"))?;
    // The app roots come from the agent's config.
    let agent = dir.path().join("agent.toml");
    std::fs::write(
        &agent,
        format!("[apps.web]\nroot = \"{}\"\n", root.display()),
    )?;
    let config = dir.path().join("heartbeat.toml");
    std::fs::write(
        &config,
        format!(
            "host = \"web-7.dc1\"\ninterval_s = 1\nagent_config = \"{}\"\n[labels]\nrole = \"web\"\nstage = \"canary\"\n",
            agent.display()
        ),
    )?;
    let mut tap = tb.tap(&["heartbeat.*"]).await?;
    let mut hb = Daemon::spawn(
        "heartbeat",
        Path::new(env!("CARGO_BIN_EXE_convoy-heartbeat")),
        &["--config", &config.to_string_lossy()],
        &tb.env(),
        dir.path(),
    )?;
    let first = tap.next(Duration::from_secs(10)).await?;
    assert_eq!(first.routing_key, "heartbeat.web-7_dc1");
    let Body::Heartbeat(beat) = first.message()?.body else {
        anyhow::bail!("not a heartbeat");
    };
    assert_eq!(beat.host.as_str(), "web-7.dc1");
    assert_eq!(beat.labels["stage"], "canary");
    assert_eq!(beat.interval_s, 1);
    assert_eq!(
        beat.apps[&"web".parse()?]
            .current
            .as_ref()
            .map(|r| r.as_str()),
        Some("r1")
    );
    assert!(beat.disk_free_bytes > 0);
    // It keeps beating, and stops cleanly on SIGTERM.
    tap.next(Duration::from_secs(5)).await?;
    let status = hb.terminate(Duration::from_secs(10)).await?;
    assert!(status.success(), "{status:?}\n{}", hb.log());
    Ok(())
}

#[tokio::test]
async fn a_bad_config_names_the_key() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("heartbeat.toml");
    std::fs::write(&config, "interval_secs = 5\n")?;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_convoy-heartbeat"))
        .args(["--config", &config.to_string_lossy(), "--print"])
        .output()?;
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("interval_secs"), "{err}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_convoy-heartbeat"))
        .args(["--config", &config.to_string_lossy(), "--print"])
        .env("CONVOY_INTERVAL_S", "often")
        .output()?;
    assert!(!out.status.success());
    Ok(())
}
