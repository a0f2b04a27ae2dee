//! Fetching over SSH from a private sshd: a deploy key, the server's host key checked
//! against known_hosts, and a wrong key or an unknown host failing at once instead of
//! looping.

mod common;

use common::{next_report, start_fetcher};
use convoy_message::{FetchReport, FetchStatus};
use convoy_testkit::git::{self, git};
use convoy_testkit::{Daemon, TestBus, wait_until};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const SSHD: &str = "/usr/sbin/sshd";

fn keygen(path: &Path, kind: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ssh-keygen")
        .args(kind)
        .args(["-q", "-N", "", "-f"])
        .arg(path)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "ssh-keygen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

async fn first_report(
    tb: &TestBus,
    dir: &Path,
    host: &str,
    config: &str,
) -> anyhow::Result<(FetchReport, Daemon)> {
    let (daemon, mut tap) = start_fetcher(tb, dir, host, config, &[]).await?;
    Ok((
        next_report(&mut tap, Duration::from_secs(60)).await?,
        daemon,
    ))
}

#[tokio::test]
async fn fetching_over_ssh_checks_the_host_key_and_bounds_the_credentials() -> anyhow::Result<()> {
    anyhow::ensure!(
        Path::new(SSHD).exists() && nix::unistd::geteuid().is_root(),
        "needs openssh-server and root: run scripts/test"
    );
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    std::fs::create_dir_all("/run/sshd")?;
    keygen(&d.join("hostkey"), &["-t", "ed25519"])?;
    keygen(&d.join("other-hostkey"), &["-t", "ed25519"])?;
    keygen(&d.join("client"), &["-t", "rsa", "-b", "2048", "-m", "PEM"])?;
    keygen(
        &d.join("stranger"),
        &["-t", "rsa", "-b", "2048", "-m", "PEM"],
    )?;
    std::fs::copy(d.join("client.pub"), d.join("authorized_keys"))?;
    let port = convoy_testkit::free_port();
    let config = format!(
        "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/hostkey\nAuthorizedKeysFile {d}/authorized_keys\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nPidFile {d}/sshd.pid\n",
        d = d.display()
    );
    std::fs::write(d.join("sshd_config"), config)?;
    let sshd = Daemon::spawn(
        "sshd",
        Path::new(SSHD),
        &["-D", "-e", "-f", &d.join("sshd_config").to_string_lossy()],
        &[],
        d,
    )?;
    wait_until(Duration::from_secs(10), "sshd to listen", || {
        let up = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
        async move { up.then_some(()) }
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", sshd.log()))?;

    let origin = d.join("origin.git");
    git::init_bare(&origin)?;
    let work = d.join("work");
    git::init(&work)?;
    let sha = git::commit_file(&work, "a.txt", "1", "first")?;
    git(
        &work,
        &["push", "-q", origin.to_str().unwrap_or_default(), "main"],
    )?;

    let known = |key: &str| -> anyhow::Result<String> {
        let public = std::fs::read_to_string(d.join(format!("{key}.pub")))?;
        let mut parts = public.split_whitespace();
        Ok(format!(
            "[127.0.0.1]:{port} {} {}\n",
            parts.next().unwrap_or(""),
            parts.next().unwrap_or("")
        ))
    };
    std::fs::write(d.join("known_hosts"), known("hostkey")?)?;
    std::fs::write(d.join("wrong_known_hosts"), known("other-hostkey")?)?;
    let tb = TestBus::new();
    let fetcher = |host: &str, key: &str, known_hosts: &str| {
        format!(
            "host = \"{host}\"\nmirror_dir = \"{d}/mirrors-{host}\"\n[repos.web]\nurl = \"ssh://root@127.0.0.1:{port}{origin}\"\nssh_key = \"{d}/{key}\"\nknown_hosts = \"{d}/{known_hosts}\"\n",
            d = d.display(),
            origin = origin.display()
        )
    };

    // The right key and host: fetched.
    let (r, _a) = first_report(
        &tb,
        d,
        "ssh-ok",
        &fetcher("ssh-ok", "client", "known_hosts"),
    )
    .await?;
    assert_eq!(
        r.status,
        FetchStatus::Fetched,
        "{:?}\n{}",
        r.error,
        sshd.log()
    );
    assert_eq!(r.refs["refs/heads/main"].as_str(), sha);

    // A host key that is not the one we know: refused before any credential is sent.
    let (r, _b) = first_report(
        &tb,
        d,
        "ssh-mitm",
        &fetcher("ssh-mitm", "client", "wrong_known_hosts"),
    )
    .await?;
    assert_eq!(r.status, FetchStatus::Failed);
    assert!(
        // libgit2 words it "invalid or unknown remote ssh hostkey"; the fetcher's log names
        // the presented key and the known_hosts file.
        r.error
            .as_deref()
            .is_some_and(|e| e.contains("hostkey") || e.contains("host key")),
        "{:?}",
        r.error
    );

    // A key the server does not accept: a prompt failure, not a loop.
    let started = std::time::Instant::now();
    let (r, _c) = first_report(
        &tb,
        d,
        "ssh-stranger",
        &fetcher("ssh-stranger", "stranger", "known_hosts"),
    )
    .await?;
    assert_eq!(r.status, FetchStatus::Failed);
    assert!(
        r.error
            .as_deref()
            .is_some_and(|e| e.contains("authentication") && e.contains("ssh_key")),
        "{:?}",
        r.error
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    Ok(())
}
