//! The daemon runtime as systemd and an operator see it: READY / WATCHDOG / STOPPING over
//! NOTIFY_SOCKET, SIGHUP reloading the trusted keys (rotation), SIGTERM exiting cleanly.

mod common;

use common::{Host, next_result};
use convoy_message::{DeployOutcome, KeyPair};
use nix::sys::signal::Signal;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

fn datagrams_until(
    sock: &UnixDatagram,
    want: &str,
    timeout: Duration,
) -> anyhow::Result<Vec<String>> {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        sock.set_read_timeout(Some(Duration::from_millis(200)))?;
        if let Ok(n) = sock.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = text.lines().any(|l| l == want);
            seen.push(text);
            if done {
                return Ok(seen);
            }
        }
    }
    anyhow::bail!("no {want} within {timeout:?}; got {seen:?}")
}

#[tokio::test]
async fn systemd_notifications_key_rotation_on_sighup_and_a_clean_stop() -> anyhow::Result<()> {
    let mut h = Host::new().await?;
    let sock_path = h.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path)?;
    let sock_str = sock_path.to_string_lossy().to_string();
    h.start_agent(&[("NOTIFY_SOCKET", &sock_str), ("WATCHDOG_USEC", "400000")])?;
    datagrams_until(&sock, "READY=1", Duration::from_secs(20))?;
    datagrams_until(&sock, "WATCHDOG=1", Duration::from_secs(5))?;

    // A command signed by a key the host does not trust yet is refused…
    let mut results = h.results_tap().await?;
    let mut dead = h.tb.dead_tap().await?;
    let new_key = KeyPair::generate("rotated-2027")?;
    let cmd = h.command(h.deploy_action("v1", "r1")?);
    h.send(&new_key.command_message("conductor@test", &cmd))
        .await?;
    let letter = dead.next(Duration::from_secs(20)).await?;
    assert_eq!(letter.header("x-convoy-reason"), Some("unknown_key"));

    // …until its public key is dropped in and the agent reloads.
    std::fs::write(
        h.path().join("keys/rotated-2027.pub"),
        new_key.public_line(),
    )?;
    h.agent.as_ref().expect("agent").signal(Signal::SIGHUP);
    datagrams_until(&sock, "RELOADING=1", Duration::from_secs(10))?;
    datagrams_until(&sock, "READY=1", Duration::from_secs(10))?;
    let cmd = h.command(h.deploy_action("v1", "r1")?);
    h.send(&new_key.command_message("conductor@test", &cmd))
        .await?;
    let r = next_result(&mut results, cmd.id).await?;
    assert_eq!(r.outcome, DeployOutcome::Succeeded, "{:?}", r.error);

    // SIGTERM: STOPPING, then a clean exit.
    let agent = h.agent.as_mut().expect("agent");
    agent.signal(Signal::SIGTERM);
    datagrams_until(&sock, "STOPPING=1", Duration::from_secs(10))?;
    let status = agent.wait(Duration::from_secs(20)).await?;
    assert!(status.success(), "{status:?}\n{}", agent.log());
    Ok(())
}

/// Starts the agent and expects it to stop at once with status 78, its message naming
/// every part of `named`.
async fn exits_78(h: &mut Host, what: &str, named: &[&str]) -> anyhow::Result<()> {
    exits_78_with(h, &[], what, named).await
}

async fn exits_78_with(
    h: &mut Host,
    env: &[(&str, &str)],
    what: &str,
    named: &[&str],
) -> anyhow::Result<()> {
    h.start_agent(env)?;
    let agent = h.agent.as_mut().expect("agent");
    let status = agent.wait(Duration::from_secs(20)).await?;
    let log = agent.log();
    assert_eq!(status.code(), Some(78), "{what}: {status:?}\n{log}");
    for part in named {
        assert!(log.contains(part), "{what}: {part:?} not in\n{log}");
    }
    Ok(())
}

/// A key file that cannot be used is a configuration error: exit 78 (EX_CONFIG, which the
/// unit does not restart in a loop), with the file and the fix named. So are two files with
/// one key id, an unreadable key directory, a journal too short to recognise replays, and
/// a broker URL that does not parse.
#[tokio::test]
async fn bad_trusted_keys_and_a_short_journal_exit_78_naming_the_cause() -> anyhow::Result<()> {
    let mut h = Host::new().await?;
    let keys = h.path().join("keys");

    let stray = keys.join("laptop.pub");
    std::fs::write(&stray, "ssh-ed25519 AAAA me@laptop\n")?;
    exits_78(
        &mut h,
        "a file that is not a key",
        &["laptop.pub", "is not a convoy key file", "move it out"],
    )
    .await?;
    std::fs::remove_file(&stray)?;

    let twin = keys.join("test-signer-2.pub");
    std::fs::write(&twin, KeyPair::generate("test-signer")?.public_line())?;
    exits_78(
        &mut h,
        "two files with one key id",
        &["test-signer.pub", "test-signer-2.pub", "\"test-signer\""],
    )
    .await?;
    std::fs::remove_file(&twin)?;

    let config = std::fs::read_to_string(&h.config)?;
    std::fs::write(&h.config, format!("journal_days = 3\n{config}"))?;
    exits_78(
        &mut h,
        "a journal shorter than a command may live",
        &["journal_days", "minimum of 8"],
    )
    .await?;
    std::fs::write(&h.config, &config)?;

    // A broker URL that cannot be parsed is no reason to restart in a loop either.
    exits_78_with(
        &mut h,
        &[(
            "CONVOY_AMQP_URL",
            "amqp://guest:guest@127.0.0.1:no-port/%2f",
        )],
        "an amqp_url that does not parse",
        &["invalid amqp_url", "fix the configuration"],
    )
    .await?;

    // A missing (or unreadable) directory; `--check-config` says the same.
    std::fs::remove_dir_all(&keys)?;
    let shown = keys.to_string_lossy().into_owned();
    exits_78(&mut h, "no key directory", &["trusted_keys_dir", &shown]).await?;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_convoy-agent"))
        .args(["--config", &h.config.to_string_lossy(), "--check-config"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains(&shown), "{stderr}");
    Ok(())
}
