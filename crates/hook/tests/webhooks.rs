//! `convoy-hook serve` as GitHub, GitLab and Gitea would call it.

use convoy_message::{Body, PushChange};
use convoy_testkit::{Daemon, TestBus, wait_until};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::path::Path;
use std::time::Duration;

fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

fn payload(before: &str, after: &str) -> Vec<u8> {
    serde_json::json!({
        "ref": "refs/heads/main",
        "before": before,
        "after": after,
        "forced": false,
        "repository": {"name": "shop", "full_name": "acme/shop"},
        "pusher": {"name": "alice"},
        "commits": [
            {"id": "1".repeat(40), "message": "older\n\nbody", "author": {"name": "Alice"}},
            {"id": after, "message": "newer", "author": {"name": "Bob"}}
        ]
    })
    .to_string()
    .into_bytes()
}

fn post(url: &str, headers: &[(&str, String)], body: &[u8]) -> (u16, String) {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .new_agent();
    let mut req = agent.post(url);
    for (k, v) in headers {
        req = req.header(*k, v.as_str());
    }
    match req.send(body) {
        Ok(mut r) => (
            r.status().as_u16(),
            r.body_mut().read_to_string().unwrap_or_default(),
        ),
        Err(e) => (0, e.to_string()),
    }
}

#[tokio::test]
async fn forge_webhooks_are_authenticated_deduplicated_and_validated() -> anyhow::Result<()> {
    let tb = TestBus::new();
    let dir = tempfile::tempdir()?;
    let port = convoy_testkit::free_port();
    let config = dir.path().join("hook.toml");
    std::fs::write(
        &config,
        format!(
            "spool_dir = \"{}\"\ndrain_interval_s = 1\n[serve]\nlisten = \"127.0.0.1:{port}\"\ngithub_secret = \"gh-secret-0123456789\"\ngitlab_token = \"gl-token-0123456789\"\ngitea_secret = \"gt-secret-0123456789\"\nbody_limit_bytes = 65536\n",
            dir.path().join("spool").display()
        ),
    )?;
    let mut tap = tb.tap(&["push.#"]).await?;
    let server = Daemon::spawn(
        "serve",
        Path::new(env!("CARGO_BIN_EXE_convoy-hook")),
        &["--config", &config.to_string_lossy(), "serve"],
        &tb.env(),
        dir.path(),
    )?;
    let url = format!("http://127.0.0.1:{port}/webhook");
    wait_until(Duration::from_secs(20), "the receiver to listen", || {
        let up = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
        async move { up.then_some(()) }
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", server.log()))?;

    let zero = "0".repeat(40);
    let after = "a".repeat(40);
    let body = payload(&zero, &after);
    let github = |delivery: &str, sig: String| {
        vec![
            ("X-GitHub-Event", "push".to_owned()),
            ("X-GitHub-Delivery", delivery.to_owned()),
            ("X-Hub-Signature-256", sig),
            ("Content-Type", "application/json".to_owned()),
        ]
    };

    // A valid GitHub delivery: one event.
    let (status, text) = post(
        &url,
        &github(
            "d-1",
            format!("sha256={}", sign("gh-secret-0123456789", &body)),
        ),
        &body,
    );
    assert_eq!(status, 202, "{text}");
    let m = tap.next(Duration::from_secs(10)).await?.message()?;
    let Body::Push(e) = m.body else {
        anyhow::bail!("not a push")
    };
    assert_eq!((e.repo.as_str(), e.change), ("shop", PushChange::Created));
    assert_eq!(e.commits[0].summary, "newer", "newest first");
    assert_eq!(e.pusher.as_deref(), Some("alice"));

    // The same delivery again: accepted, not published twice.
    let (status, _) = post(
        &url,
        &github(
            "d-1",
            format!("sha256={}", sign("gh-secret-0123456789", &body)),
        ),
        &body,
    );
    assert_eq!(status, 200);
    // A wrong signature, and none at all: 401, nothing published.
    let (status, _) = post(
        &url,
        &github("d-2", format!("sha256={}", sign("wrong", &body))),
        &body,
    );
    assert_eq!(status, 401);
    let (status, _) = post(&url, &github("d-3", String::new()), &body);
    assert_eq!(status, 401);
    tap.expect_silence(Duration::from_millis(1500)).await?;

    // Malformed JSON, properly signed: 400 with the reason.
    let junk = b"{\"ref\": ".to_vec();
    let (status, text) = post(
        &url,
        &github(
            "d-4",
            format!("sha256={}", sign("gh-secret-0123456789", &junk)),
        ),
        &junk,
    );
    assert_eq!(status, 400);
    assert!(text.contains("malformed"), "{text}");
    // A repository name convoy cannot use: 400 naming the fix.
    let dotted = String::from_utf8(body.clone())?
        .replace("\"shop\"", "\"shop.v2\"")
        .into_bytes();
    let (status, text) = post(
        &url,
        &github(
            "d-5",
            format!("sha256={}", sign("gh-secret-0123456789", &dotted)),
        ),
        &dotted,
    );
    assert_eq!(status, 400);
    assert!(text.contains("repo_names"), "{text}");
    // A ping: answered.
    let (status, _) = post(
        &url,
        &[
            ("X-GitHub-Event", "ping".into()),
            (
                "X-Hub-Signature-256",
                format!("sha256={}", sign("gh-secret-0123456789", b"{}")),
            ),
        ],
        b"{}",
    );
    assert_eq!(status, 200);
    // Too big: 413.
    let big = vec![b' '; 100_000];
    let (status, _) = post(
        &url,
        &github(
            "d-6",
            format!("sha256={}", sign("gh-secret-0123456789", &big)),
        ),
        &big,
    );
    assert_eq!(status, 413);

    // GitLab: the token header.
    let update = payload(&after, &"b".repeat(40));
    let gitlab = |token: &str| {
        vec![
            ("X-Gitlab-Event", "Push Hook".to_owned()),
            ("X-Gitlab-Event-UUID", "gl-1".to_owned()),
            ("X-Gitlab-Token", token.to_owned()),
        ]
    };
    assert_eq!(post(&url, &gitlab("nope"), &update).0, 401);
    assert_eq!(post(&url, &gitlab("gl-token-0123456789"), &update).0, 202);
    let m = tap.next(Duration::from_secs(10)).await?.message()?;
    let Body::Push(e) = m.body else {
        anyhow::bail!("not a push")
    };
    assert_eq!(e.change, PushChange::Updated);

    // Gitea: a bare hex signature.
    let gitea = vec![
        ("X-Gitea-Event", "push".to_owned()),
        ("X-GitHub-Event", "push".to_owned()),
        ("X-Gitea-Delivery", "gt-1".to_owned()),
        ("X-Gitea-Signature", sign("gt-secret-0123456789", &update)),
    ];
    assert_eq!(post(&url, &gitea, &update).0, 202);
    tap.next(Duration::from_secs(10)).await?;
    // Not a forge at all.
    assert_eq!(post(&url, &[], &update).0, 400);
    tap.expect_silence(Duration::from_millis(1000)).await?;
    Ok(())
}
