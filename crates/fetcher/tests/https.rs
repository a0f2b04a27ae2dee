//! Fetching over HTTPS from a real git server (`git http-backend` behind TLS and Basic auth):
//! a token from `token_file` is accepted, a wrong one fails promptly without a credential
//! loop, and the server's certificate is checked — against `tls_ca_file` when it is given,
//! else against the system's store — before any credential is sent.

mod common;

use common::{next_report, push_event, start_fetcher};
use convoy_bus::{Bus, Outgoing, Publisher, Retry};
use convoy_message::{FetchReport, FetchStatus};
use convoy_testkit::git::{self, git};
use convoy_testkit::{Daemon, GitHttpsServer, Tap, TestBus, TestCa, wait_until};
use std::path::Path;
use std::time::{Duration, Instant};

const TOKEN: &str = "glpat-right-token-0123456789";

/// A fetcher config for the repo `web` at `url`, with extra `keys` lines.
fn config(dir: &Path, host: &str, url: &str, keys: &str) -> String {
    format!(
        "host = \"{host}\"\nmirror_dir = \"{d}/mirrors-{host}\"\n[repos.web]\nurl = \"{url}\"\n{keys}",
        d = dir.display(),
    )
}

/// Starts a fetcher for `host` mirroring `url`, and waits for its first (catch-up) report.
async fn catch_up(
    tb: &TestBus,
    dir: &Path,
    host: &str,
    url: &str,
    keys: &str,
    env: &[(String, String)],
) -> anyhow::Result<(Daemon, Tap, FetchReport)> {
    let (daemon, mut tap) =
        start_fetcher(tb, dir, host, &config(dir, host, url, keys), env).await?;
    let report = next_report(&mut tap, Duration::from_secs(60)).await?;
    Ok((daemon, tap, report))
}

/// The report says `web` was fetched with main at `sha`, and `host`'s mirror has it.
fn assert_fetched(
    r: &FetchReport,
    daemon: &Daemon,
    dir: &Path,
    host: &str,
    sha: &str,
) -> anyhow::Result<()> {
    assert_eq!(
        r.status,
        FetchStatus::Fetched,
        "{:?}\n{}",
        r.error,
        daemon.log()
    );
    assert_eq!(r.repo.as_str(), "web");
    assert_eq!(r.refs["refs/heads/main"].as_str(), sha);
    let mirror = dir.join(format!("mirrors-{host}/web.git"));
    assert_eq!(git::rev_parse(&mirror, "refs/heads/main")?, sha);
    Ok(())
}

#[tokio::test]
async fn fetching_over_https_uses_the_token_and_checks_the_certificate() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let served = d.join("served");
    let origin = served.join("web.git");
    git::init_bare(&origin)?;
    let work = d.join("work");
    git::init(&work)?;
    let first = git::commit_file(&work, "a.txt", "1", "first")?;
    let origin_path = origin.to_string_lossy().into_owned();
    git(&work, &["push", "-q", &origin_path, "main"])?;

    let ca = TestCa::new("convoy test git CA")?;
    let stranger_ca = TestCa::new("some other CA")?;
    std::fs::write(d.join("ca.pem"), ca.pem())?;
    std::fs::write(d.join("other-ca.pem"), stranger_ca.pem())?;
    let server =
        GitHttpsServer::start(&served, ca.issue(&["127.0.0.1"])?, "x-access-token", TOKEN)?;
    let port = server.port();
    let url = format!("https://127.0.0.1:{port}/web.git");
    // Written as an editor would, with a trailing newline.
    std::fs::write(d.join("token"), format!("{TOKEN}\n"))?;
    std::fs::write(d.join("wrong-token"), "glpat-revoked-token\n")?;
    let token = format!("token_file = \"{}/token\"\n", d.display());
    let trust = format!("tls_ca_file = \"{}/ca.pem\"\n", d.display());
    let tb = TestBus::new();

    // The right token and the server's CA as tls_ca_file: the catch-up fetch, then a push.
    let keys = format!("{token}{trust}");
    let (ok, mut tap, r) = catch_up(&tb, d, "https-ok", &url, &keys, &[]).await?;
    assert_fetched(&r, &ok, d, "https-ok", &first)?;
    assert!(server.served() >= 2, "{} requests served", server.served());

    let second = git::commit_file(&work, "a.txt", "2", "second")?;
    git(&work, &["push", "-q", &origin_path, "main"])?;
    let event = push_event(&second)?;
    let publisher = Publisher::new(Bus::new(tb.config(), "test-hook")?);
    publisher
        .publish(
            &Outgoing::message(&event)?,
            Retry::within(Duration::from_secs(20)),
        )
        .await?;
    // A fetch that started before the push may report first; the one answering it follows.
    let r = loop {
        let r = next_report(&mut tap, Duration::from_secs(60)).await?;
        if r.for_events.contains(&event.id) {
            break r;
        }
    };
    assert_fetched(&r, &ok, d, "https-ok", &second)?;
    drop(ok);

    // No tls_ca_file, the CA in the system's store (here: SSL_CERT_FILE): fetched too.
    let env = [(
        "SSL_CERT_FILE".to_owned(),
        d.join("ca.pem").to_string_lossy().into_owned(),
    )];
    let (system, _, r) = catch_up(&tb, d, "https-system", &url, &token, &env).await?;
    assert_fetched(&r, &system, d, "https-system", &second)?;
    drop(system);

    // Certificates the fetcher must not trust. Each fails before any HTTP request, so the
    // token never reaches the impostor, and the mirror stays empty.
    let before = server.requests();
    let localhost = format!("https://localhost:{port}/web.git");
    let other = format!("tls_ca_file = \"{}/other-ca.pem\"\n", d.display());
    for (host, url, keys, expect) in [
        // The system's store does not know the test CA.
        ("https-untrusted", &url, token.clone(), "tls_ca_file"),
        // tls_ca_file names another CA.
        (
            "https-other-ca",
            &url,
            format!("{token}{other}"),
            "not trusted by tls_ca_file",
        ),
        // The right CA, but the certificate is for 127.0.0.1, not localhost.
        (
            "https-wrong-name",
            &localhost,
            format!("{token}{trust}"),
            "localhost",
        ),
    ] {
        let (daemon, _, r) = catch_up(&tb, d, host, url, &keys, &[]).await?;
        assert_eq!(r.status, FetchStatus::Failed, "{host}\n{}", daemon.log());
        let error = r.error.clone().unwrap_or_default();
        assert!(
            error.contains("certificate") && error.contains(expect),
            "{host}: {error}"
        );
        let mirror = d.join(format!("mirrors-{host}/web.git"));
        assert!(
            git::rev_parse(&mirror, "refs/heads/main").is_err(),
            "{host}"
        );
    }
    assert_eq!(
        server.requests(),
        before,
        "a request got past the TLS check"
    );

    // A wrong token: the first fetch fails within seconds, its report and log name the repo
    // and the token, and every attempt stops after three refusals (no credential loop).
    let (challenged, refused, served_before) =
        (server.challenged(), server.refused(), server.served());
    let started = Instant::now();
    let wrong = format!("token_file = \"{}/wrong-token\"\n{trust}", d.display());
    let (bad, _, r) = catch_up(&tb, d, "https-wrong-token", &url, &wrong, &[]).await?;
    let took = started.elapsed();
    let error = r.error.clone().unwrap_or_default();
    assert_eq!(r.status, FetchStatus::Failed, "{}", bad.log());
    assert_eq!(r.repo.as_str(), "web");
    assert!(
        error.contains("refusing the token") && error.contains("wrong-token"),
        "{error}"
    );
    assert!(took < Duration::from_secs(30), "took {took:?}");
    wait_until(Duration::from_secs(10), "the failure in the log", || {
        let log = bad.log();
        async move {
            log.lines()
                .any(|l| {
                    l.contains("fetch failed")
                        && l.contains("repo")
                        && l.contains("web")
                        && l.contains("refusing the token")
                })
                .then_some(())
        }
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", bad.log()))?;
    drop(bad); // It retries with backoff; stop it before counting.
    let challenged = server.challenged() - challenged;
    let refused = server.refused() - refused;
    assert!(challenged >= 1, "no unauthenticated first request");
    assert!(
        refused >= 1 && refused <= 3 * challenged,
        "{refused} wrong-token requests for {challenged} fetch attempts"
    );
    assert_eq!(server.served(), served_before, "a wrong token was served");
    assert!(
        git::rev_parse(
            &d.join("mirrors-https-wrong-token/web.git"),
            "refs/heads/main"
        )
        .is_err()
    );
    Ok(())
}
