//! `convoy demo` as a newcomer runs it: the fleet comes up, the dashboard login works, the
//! manual gate waits for `convoy promote`, every host ends up on the tag, and Ctrl-C stops
//! every process it started. And `--ci` that runs out of time fails, clearly, and cleanly.

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CONVOY: &str = env!("CARGO_BIN_EXE_convoy");

/// The demo finds the daemons next to `convoy`: make sure they are built.
fn daemons_built() {
    for (package, bin) in [
        ("convoy-conductor", "convoy-conductor"),
        ("convoy-agent", "convoy-agent"),
        ("convoy-fetcher", "convoy-fetcher"),
        ("convoy-heartbeat", "convoy-heartbeat"),
        ("convoy-hook", "convoy-hook"),
        ("convoy-ci", "convoy-ci"),
        ("convoy-git", "convoy-git"),
    ] {
        convoy_testkit::workspace_bin(package, bin);
    }
}

fn start(args: &[&str], out: &Path) -> anyhow::Result<Child> {
    let log = std::fs::File::create(out)?;
    let mut cmd = Command::new(CONVOY);
    cmd.arg("demo")
        .arg("--amqp-url")
        .arg(convoy_testkit::shared_amqp_url());
    // The node rabbitmqctl must reach when that broker is not the local default node.
    if let Ok(node) = std::env::var("CONVOY_TEST_RABBITMQ_NODE")
        && !node.is_empty()
    {
        cmd.args(["--node", &node]);
    }
    Ok(cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?)
}

/// Waits until the demo's output contains `text`.
fn wait_for(
    out: &Path,
    text: &str,
    child: &mut Child,
    timeout: Duration,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let so_far = std::fs::read_to_string(out).unwrap_or_default();
        if so_far.contains(text) {
            return Ok(so_far);
        }
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("the demo exited ({status}) before saying {text:?}:\n{so_far}");
        }
        if Instant::now() > deadline {
            anyhow::bail!("the demo did not say {text:?} within {timeout:?}:\n{so_far}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Processes whose command line mentions `dir` (every daemon's config and app is there).
fn processes_in(dir: &Path) -> Vec<(i32, String)> {
    let needle = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&needle) && pid != std::process::id() as i32 {
            found.push((pid, cmdline));
        }
    }
    found
}

fn wait_exit(child: &mut Child, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            anyhow::bail!("the demo did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn line_after<'a>(text: &'a str, label: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.trim_start().strip_prefix(label))
        .map(str::trim)
}

#[test]
fn a_newcomer_promotes_the_gate_and_ctrl_c_stops_everything() -> anyhow::Result<()> {
    daemons_built();
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("demo");
    let out = tmp.path().join("demo.out");
    let port = convoy_testkit::free_port().to_string();
    let dir_arg = dir.to_string_lossy().into_owned();
    let mut demo = start(
        &[
            "--hosts",
            "3",
            "--dir",
            &dir_arg,
            "--listen",
            &format!("127.0.0.1:{port}"),
        ],
        &out,
    )?;
    let said = wait_for(
        &out,
        "the manual gate waits",
        &mut demo,
        Duration::from_secs(120),
    )?;

    // The dashboard's login, with the printed password.
    let password = line_after(&said, "login      admin /")
        .ok_or_else(|| anyhow::anyhow!("no login printed:\n{said}"))?
        .to_owned();
    let base = format!("http://127.0.0.1:{port}");
    let http = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .new_agent();
    let mut form = http.get(&format!("{base}/login")).call()?;
    let cookie = form
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|c| c.split(';').next())
        .collect::<Vec<_>>()
        .join("; ");
    let page = form.body_mut().read_to_string()?;
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .ok_or_else(|| anyhow::anyhow!("no CSRF token in the login page"))?;
    let login = http
        .post(&format!("{base}/login"))
        .header("Cookie", &cookie)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .send(format!("user=admin&password={password}&csrf={csrf}&next=/"))?;
    assert_eq!(login.status().as_u16(), 303, "the printed login must work");

    // The CLI, with the env file the demo wrote.
    let env = std::fs::read_to_string(dir.join("env"))?;
    let var = |name: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("export {name}=")))
            .unwrap_or_default()
            .to_owned()
    };
    let promote = Command::new(CONVOY)
        .env("CONVOY_URL", var("CONVOY_URL"))
        .env("CONVOY_TOKEN", var("CONVOY_TOKEN"))
        .args(["promote", "hello"])
        .output()?;
    assert!(
        promote.status.success(),
        "convoy promote: {}",
        String::from_utf8_lossy(&promote.stderr)
    );
    wait_for(
        &out,
        "every host runs v1.0.0",
        &mut demo,
        Duration::from_secs(90),
    )?;
    for i in 1..=3 {
        let current = dir.join(format!(
            "hosts/web-{i}/apps/hello/current/public/version.txt"
        ));
        assert!(current.exists(), "web-{i} has no current release");
    }

    let running = processes_in(&dir);
    // A conductor, and per host an agent, a fetcher, a heartbeat and the app.
    assert!(running.len() > 3 * 4, "{running:#?}");
    kill(Pid::from_raw(demo.id() as i32), Signal::SIGINT)?;
    let status = wait_exit(&mut demo, Duration::from_secs(40))?;
    let said = std::fs::read_to_string(&out)?;
    assert!(
        status.success(),
        "Ctrl-C is how the demo ends: {status}\n{said}"
    );
    let left = processes_in(&dir);
    assert!(left.is_empty(), "orphans after Ctrl-C: {left:#?}");
    Ok(())
}

#[test]
fn ci_mode_out_of_time_fails_with_the_reason_and_leaves_nothing_running() -> anyhow::Result<()> {
    daemons_built();
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("demo");
    let out = tmp.path().join("demo.out");
    let dir_arg = dir.to_string_lossy().into_owned();
    let port = convoy_testkit::free_port().to_string();
    let mut demo = start(
        &[
            "--ci",
            "--timeout",
            "1",
            "--hosts",
            "2",
            "--dir",
            &dir_arg,
            "--listen",
            &format!("127.0.0.1:{port}"),
        ],
        &out,
    )?;
    let status = wait_exit(&mut demo, Duration::from_secs(60))?;
    let said = std::fs::read_to_string(&out)?;
    assert_eq!(status.code(), Some(1), "{said}");
    assert!(said.contains("timed out waiting for"), "{said}");
    assert!(
        said.contains("logs in"),
        "the logs are kept and named: {said}"
    );
    let left = processes_in(&dir);
    assert!(left.is_empty(), "left running: {left:#?}");
    Ok(())
}

#[test]
fn ci_mode_fails_with_the_hosts_error_when_a_health_check_fails() -> anyhow::Result<()> {
    daemons_built();
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("demo");
    let out = tmp.path().join("demo.out");
    let dir_arg = dir.to_string_lossy().into_owned();
    let port = convoy_testkit::free_port().to_string();
    let mut demo = start(
        &[
            "--ci",
            "--hosts",
            "3",
            "--broken-host",
            "web-3",
            "--dir",
            &dir_arg,
            "--listen",
            &format!("127.0.0.1:{port}"),
        ],
        &out,
    )?;
    let status = wait_exit(&mut demo, Duration::from_secs(120))?;
    let said = std::fs::read_to_string(&out)?;
    assert_eq!(status.code(), Some(1), "{said}");
    let last = said
        .lines()
        .find(|l| l.starts_with("convoy demo: rollout"))
        .unwrap_or_default();
    assert!(
        last.contains("rolled_back") && last.contains("web-3: health check failed"),
        "{said}"
    );
    let left = processes_in(&dir);
    assert!(left.is_empty(), "left running: {left:#?}");
    Ok(())
}
