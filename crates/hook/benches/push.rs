//! What the post-receive hook adds to a `git push`: the same pushes to a bare repository
//! without the hook and with it, broker up and broker down. `cargo bench -p convoy-hook`.

use convoy_testkit::TestBus;
use convoy_testkit::git::{self, git};
use hdrhistogram::Histogram;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

fn timed_push(work: &Path, remote: &str, env: &[(String, String)]) -> anyhow::Result<u64> {
    let t0 = Instant::now();
    let status = Command::new("git")
        .current_dir(work)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(["push", "-q", remote, "main"])
        .status()?;
    anyhow::ensure!(status.success());
    Ok(t0.elapsed().as_micros() as u64)
}

fn series(
    n: usize,
    work: &Path,
    remote: &str,
    env: &[(String, String)],
) -> anyhow::Result<Histogram<u64>> {
    let mut h = Histogram::<u64>::new(3)?;
    for i in 0..n {
        git::commit_file(work, "a.txt", &format!("{remote}{i}"), "bench")?;
        h.record(timed_push(work, remote, env)?)?;
    }
    Ok(h)
}

fn main() -> anyhow::Result<()> {
    let n = 40;
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let tb = TestBus::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Something must be bound to push.#, or every event is unroutable and spooled.
    let _tap = rt.block_on(tb.tap(&["push.#"]))?;
    let plain = d.join("plain.git");
    let hooked = d.join("hooked.git");
    git::init_bare(&plain)?;
    git::init_bare(&hooked)?;
    let status = Command::new(env!("CARGO_BIN_EXE_convoy-hook"))
        .arg("install")
        .arg(&hooked)
        .status()?;
    anyhow::ensure!(status.success());
    let work = d.join("work");
    git::init(&work)?;
    git::commit_file(&work, "a.txt", "0", "init")?;
    git(
        &work,
        &["remote", "add", "plain", plain.to_str().unwrap_or_default()],
    )?;
    git(
        &work,
        &[
            "remote",
            "add",
            "hooked",
            hooked.to_str().unwrap_or_default(),
        ],
    )?;
    let mut env = tb.env();
    env.push((
        "CONVOY_SPOOL_DIR".into(),
        d.join("spool").to_string_lossy().into(),
    ));
    // Warm up both.
    timed_push(&work, "plain", &env)?;
    timed_push(&work, "hooked", &env)?;

    let without = series(n, &work, "plain", &env)?;
    let with = series(n, &work, "hooked", &env)?;
    let mut down = env.clone();
    down[0].1 = format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f",
        convoy_testkit::free_port()
    );
    let broker_down = series(5, &work, "hooked", &down)?;
    let ms = |us: u64| us as f64 / 1000.0;
    println!("git push to a local bare repository, {n} pushes each:");
    println!(
        "  without the hook        p50 {:.1} ms  p99 {:.1} ms",
        ms(without.value_at_quantile(0.5)),
        ms(without.value_at_quantile(0.99))
    );
    println!(
        "  with the hook, bus up   p50 {:.1} ms  p99 {:.1} ms",
        ms(with.value_at_quantile(0.5)),
        ms(with.value_at_quantile(0.99))
    );
    println!(
        "  added by the hook       p50 {:.1} ms",
        ms(with
            .value_at_quantile(0.5)
            .saturating_sub(without.value_at_quantile(0.5)))
    );
    println!(
        "  with the hook, bus down p50 {:.0} ms  max {:.0} ms  (budget 2000 ms, 5 pushes; events spooled)",
        ms(broker_down.value_at_quantile(0.5)),
        ms(broker_down.max())
    );
    Ok(())
}
