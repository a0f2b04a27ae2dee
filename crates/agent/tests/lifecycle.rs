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
