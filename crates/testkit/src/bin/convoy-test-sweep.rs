//! Deletes what killed test runs left on a shared broker: queues and exchanges named by
//! [`convoy_testkit::unique`] (`t-<pid>-<hex>`, `h-<pid>-<hex>`…) whose process is gone.
//! A test cleans up after itself when it ends; one killed (a timeout, Ctrl-C, SIGKILL)
//! cannot, and its quorum queues hold the broker's file handles until it runs out.
//!
//! Reads names on stdin (one per line, as `rabbitmqctl list_queues -q name` prints them),
//! and deletes those of dead processes through the broker at `CONVOY_TEST_AMQP_URL` (or
//! guest on 127.0.0.1). `--exchanges` deletes exchanges instead.

use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};
use std::io::BufRead;
use std::time::Duration;

/// `<prefix>-<pid>-<8 hex>` at the start of a name: the pid, if its process is gone.
fn dead_pid(name: &str) -> Option<u32> {
    let mut parts = name.splitn(3, '-');
    let prefix = parts.next()?;
    let pid: u32 = parts.next()?.parse().ok()?;
    let rest = parts.next()?;
    let id = rest.get(..8)?;
    let ok = !prefix.is_empty()
        && prefix.len() <= 8
        && prefix.chars().all(|c| c.is_ascii_lowercase())
        && id.chars().all(|c| c.is_ascii_hexdigit());
    (ok && !std::path::Path::new(&format!("/proc/{pid}")).exists()).then_some(pid)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let exchanges = std::env::args().any(|a| a == "--exchanges");
    let names: Vec<String> = std::io::stdin()
        .lock()
        .lines()
        .map_while(Result::ok)
        .map(|l| l.trim().to_owned())
        .filter(|n| dead_pid(n).is_some())
        .collect();
    if names.is_empty() {
        return Ok(());
    }
    let conn = Connection::connect(
        &convoy_testkit::shared_amqp_url(),
        ConnectionProperties::default(),
    )
    .await?;
    let ch = conn.create_channel().await?;
    let mut deleted = 0;
    for chunk in names.chunks(50) {
        let results = if exchanges {
            let ops = chunk
                .iter()
                .map(|n| ch.exchange_delete(n.as_str().into(), ExchangeDeleteOptions::default()));
            futures_util::future::join_all(ops).await
        } else {
            let ops = chunk.iter().map(|n| async {
                ch.queue_delete(n.as_str().into(), QueueDeleteOptions::default())
                    .await
                    .map(|_| ())
            });
            futures_util::future::join_all(ops).await
        };
        deleted += results.iter().filter(|r| r.is_ok()).count();
        if results.iter().any(Result::is_err) {
            break;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.close(200, "swept".into())).await;
    println!(
        "deleted {deleted} {} left by test runs that were killed",
        if exchanges { "exchanges" } else { "queues" }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::dead_pid;

    #[test]
    fn only_names_of_dead_test_processes() {
        let me = std::process::id();
        assert_eq!(
            dead_pid(&format!("t-{me}-0123abcd.conductor")),
            None,
            "alive"
        );
        assert_eq!(dead_pid("t-999999999-0123abcd.cmd.h1"), Some(999_999_999));
        assert_eq!(dead_pid("t-999999999-0123abcd"), Some(999_999_999));
        for keep in [
            "convoy.conductor",
            "convoy.cmd.web-1",
            "t-x-0123abcd",
            "t-999999999-xyz",
        ] {
            assert_eq!(dead_pid(keep), None, "{keep}");
        }
    }
}
