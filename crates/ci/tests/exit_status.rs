//! Exit statuses of the real binary: a configuration that cannot be used stops the bridge
//! with 78 (EX_CONFIG, which convoy-ci.service does not restart in a loop) and a message
//! naming the file or key, before it connects to anything.

use convoy_testkit::process::Daemon;
use std::path::Path;
use std::time::Duration;

/// `convoy-ci --config CONFIG run` in a clean environment; its exit status and output. A
/// bridge that starts instead of exiting is killed after a few seconds (and fails the test).
async fn run(config: &Path, log_dir: &Path) -> anyhow::Result<(Option<i32>, String)> {
    // A broker nobody listens on: nothing here may get as far as needing one.
    let dead = format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f",
        convoy_testkit::free_port()
    );
    let _ = std::fs::remove_file(log_dir.join("ci.log"));
    let mut ci = Daemon::spawn(
        "ci",
        Path::new(env!("CARGO_BIN_EXE_convoy-ci")),
        &["--config", &config.to_string_lossy(), "run"],
        &[("CONVOY_AMQP_URL".into(), dead)],
        log_dir,
    )?;
    let status = ci.wait(Duration::from_secs(10)).await;
    let log = ci.log();
    Ok((
        status.map_err(|e| anyhow::anyhow!("{e}: {log}"))?.code(),
        log,
    ))
}

#[tokio::test]
async fn an_unusable_config_exits_78_naming_the_key() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("state").to_string_lossy().into_owned();
    let path = dir.path().join("ci.toml");
    for (text, expected) in [
        ("[jenkins]\npoll_interval_s = 2\n", "poll_interval_s"),
        (
            "[jenkins]\nurl = \"jenkins.example.com\"\n",
            "config key `jenkins.url`",
        ),
        (
            "[jenkins]\ntoken_file = \"/nonexistent/convoy-ci-token\"\n",
            "config key `jenkins.token_file`",
        ),
        (
            "[notify]\nlisten = \"127.0.0.1:0\"\ntoken = \"short\"\n",
            "config key `notify.token` is shorter than 16 characters",
        ),
        (
            "[notify]\nlisten = \"notify\"\ntoken = \"a-long-enough-token\"\n",
            "config key `notify.listen`",
        ),
    ] {
        std::fs::write(&path, format!("state_dir = \"{state}\"\n{text}"))?;
        let (code, err) = run(&path, dir.path()).await?;
        assert_eq!(code, Some(78), "{text}: {err}");
        assert!(err.contains("convoy-ci: "), "{text}: {err}");
        assert!(err.contains(expected), "{text}: {err}");
    }
    Ok(())
}
