//! The bridge against a local server that answers as Jenkins' remote-access API does, and
//! plugin-free status from a job through the CLI and through curl.

use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use convoy_message::{Body, BuildEvent, BuildStatus};
use convoy_testkit::{Daemon, Tap, TestBus, wait_until};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
struct Fake {
    port: u16,
    triggers: Mutex<u32>,
    params: Mutex<Vec<HashMap<String, String>>>,
    queue_polls: Mutex<u32>,
    build_polls: Mutex<u32>,
}

async fn trigger(
    State(f): State<Arc<Fake>>,
    UrlPath(job): UrlPath<String>,
    headers: HeaderMap,
    body: String,
) -> impl IntoResponse {
    if headers.get("authorization").is_none() {
        return (
            StatusCode::FORBIDDEN,
            HeaderMap::new(),
            "Authentication required".to_owned(),
        );
    }
    if job != "shop-build" {
        return (
            StatusCode::NOT_FOUND,
            HeaderMap::new(),
            "Not Found".to_owned(),
        );
    }
    if headers.get("jenkins-crumb").and_then(|v| v.to_str().ok()) != Some("crumb-123") {
        // CSRF protection on: the bridge must fetch a crumb and send it back.
        let text = "No valid crumb was included in the request".to_owned();
        return (StatusCode::FORBIDDEN, HeaderMap::new(), text);
    }
    let n = {
        let mut t = f.triggers.lock().unwrap_or_else(|p| p.into_inner());
        *t += 1;
        *t
    };
    if n <= 2 {
        // Jenkins is (re)starting.
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            HeaderMap::new(),
            "Please wait while Jenkins is getting ready".to_owned(),
        );
    }
    let params: HashMap<String, String> = serde_urlencoded::from_str(&body).unwrap_or_default();
    f.params
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(params);
    let mut h = HeaderMap::new();
    let location = format!("http://127.0.0.1:{}/queue/item/7/", f.port);
    h.insert("location", location.parse().expect("header"));
    (StatusCode::CREATED, h, String::new())
}

async fn queue_item(State(f): State<Arc<Fake>>) -> impl IntoResponse {
    let n = {
        let mut q = f.queue_polls.lock().unwrap_or_else(|p| p.into_inner());
        *q += 1;
        *q
    };
    if n < 2 {
        return axum::Json(
            serde_json::json!({"cancelled": false, "why": "Waiting for next available executor"}),
        );
    }
    axum::Json(serde_json::json!({
        "cancelled": false,
        "executable": {"number": 42, "url": format!("http://127.0.0.1:{}/job/shop-build/42/", f.port)}
    }))
}

async fn build(State(f): State<Arc<Fake>>) -> impl IntoResponse {
    let n = {
        let mut b = f.build_polls.lock().unwrap_or_else(|p| p.into_inner());
        *b += 1;
        *b
    };
    if n < 3 {
        return axum::Json(serde_json::json!({"building": true, "result": null, "number": 42}));
    }
    axum::Json(serde_json::json!({"building": false, "result": "SUCCESS", "number": 42}))
}

async fn fake_jenkins() -> anyhow::Result<Arc<Fake>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let fake = Arc::new(Fake {
        port: listener.local_addr()?.port(),
        ..Fake::default()
    });
    let app = Router::new()
        .route("/job/{job}/buildWithParameters", post(trigger))
        .route("/queue/item/7/api/json", get(queue_item))
        .route(
            "/crumbIssuer/api/json",
            get(|| async {
                axum::Json(
                    serde_json::json!({"crumb": "crumb-123", "crumbRequestField": "Jenkins-Crumb"}),
                )
            }),
        )
        .route("/job/shop-build/42/api/json", get(build))
        .with_state(fake.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(fake)
}

async fn next_build(tap: &mut Tap) -> anyhow::Result<BuildEvent> {
    match tap.next(Duration::from_secs(30)).await?.message()?.body {
        Body::Build(b) => Ok(b),
        other => anyhow::bail!("not a build event: {other:?}"),
    }
}

fn push(repo: &str, git_ref: &str, sha: &str) -> anyhow::Result<convoy_message::Message> {
    use convoy_message::names::{Name, RefName, Sha};
    let git_ref = RefName::new(git_ref)?;
    Ok(convoy_message::Message::new(
        "hook@test",
        Body::Push(convoy_message::PushEvent {
            repo: Name::new(repo)?,
            ref_kind: convoy_message::RefKind::of(&git_ref),
            git_ref,
            old: Sha::new("1".repeat(40))?,
            new: Sha::new(sha)?,
            change: convoy_message::PushChange::Updated,
            commits: vec![],
            truncated: false,
            pusher: None,
        }),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_triggers_a_build_that_is_followed_to_its_result_and_jobs_report_themselves()
-> anyhow::Result<()> {
    let fake = fake_jenkins().await?;
    let tb = TestBus::new();
    tb.track(format!("{}.ci", tb.exchange));
    let dir = tempfile::tempdir()?;
    let notify_port = convoy_testkit::free_port();
    let token = "notify-token-0123456789";
    let config = dir.path().join("ci.toml");
    std::fs::write(
        &config,
        format!(
            r#"state_dir = "{state}"
[jenkins]
url = "http://127.0.0.1:{port}"
user = "convoy"
token = "api-token"
poll_interval_ms = 100

[notify]
listen = "127.0.0.1:{notify_port}"
token = "{token}"

[[jobs]]
repo = "shop"
refs = ["refs/heads/**"]
ignore = ["refs/heads/wip/**"]
job = "shop-build"
parameters = {{ GIT_COMMIT = "{{commit}}", BRANCH = "{{short_ref}}" }}

[[jobs]]
repo = "shop"
refs = ["refs/tags/*"]
job = "missing"
"#,
            state = dir.path().join("state").display(),
            port = fake.port,
        ),
    )?;
    let mut tap = tb.tap(&["build.#"]).await?;
    let bridge = Daemon::spawn(
        "ci",
        Path::new(env!("CARGO_BIN_EXE_convoy-ci")),
        &["--config", &config.to_string_lossy()],
        &tb.env(),
        dir.path(),
    )?;
    let publisher = convoy_bus::Publisher::new(convoy_bus::Bus::new(tb.config(), "test-hook")?);
    let send = |m: convoy_message::Message| {
        let publisher = &publisher;
        async move {
            let out = convoy_bus::Outgoing::message(&m)?;
            publisher
                .publish(&out, convoy_bus::Retry::within(Duration::from_secs(20)))
                .await?;
            anyhow::Ok(())
        }
    };

    // A push to main: Jenkins answers 503 twice, then the build runs to SUCCESS.
    let sha = "c".repeat(40);
    send(push("shop", "refs/heads/main", &sha)?).await?;
    let queued = next_build(&mut tap)
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", bridge.log()))?;
    assert_eq!(
        (queued.status, queued.job.as_str(), queued.commit.as_str()),
        (BuildStatus::Queued, "shop-build", sha.as_str())
    );
    let started = next_build(&mut tap).await?;
    assert_eq!(started.status, BuildStatus::Started);
    assert_eq!(started.build_number, Some(42));
    assert!(
        started
            .url
            .as_deref()
            .unwrap_or("")
            .ends_with("/job/shop-build/42/")
    );
    let done = next_build(&mut tap).await?;
    assert_eq!(done.status, BuildStatus::Succeeded);
    assert_eq!(
        *fake.triggers.lock().unwrap_or_else(|p| p.into_inner()),
        3,
        "a crumb fetched, two 503s, then accepted"
    );
    let params = fake.params.lock().unwrap_or_else(|p| p.into_inner())[0].clone();
    assert_eq!(params["GIT_COMMIT"], sha);
    assert_eq!(params["BRANCH"], "main");

    // An ignored branch: nothing. A tag mapped to a job Jenkins does not have: failed, named.
    send(push("shop", "refs/heads/wip/x", &sha)?).await?;
    send(push("shop", "refs/tags/v1", &sha)?).await?;
    let failed = next_build(&mut tap).await?;
    assert_eq!(
        (failed.status, failed.job.as_str()),
        (BuildStatus::Failed, "missing")
    );
    assert!(
        failed
            .detail
            .as_deref()
            .unwrap_or("")
            .contains("no such job"),
        "{:?}",
        failed.detail
    );
    assert!(bridge.log().contains("missing"), "a log line names the job");

    // A job's shell step reports itself through the CLI…
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_convoy-ci"))
        .args(["--config", &config.to_string_lossy(), "notify", "failed"])
        .envs(tb.env())
        .env("JOB_NAME", "shop-build")
        .env("BUILD_NUMBER", "43")
        .env("BUILD_URL", "http://jenkins/job/shop-build/43/")
        .env("GIT_COMMIT", &sha)
        .env("GIT_BRANCH", "origin/main")
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let e = next_build(&mut tap).await?;
    assert_eq!((e.status, e.build_number), (BuildStatus::Failed, Some(43)));
    assert_eq!(e.repo.as_str(), "shop", "the repo comes from the job rule");
    assert_eq!(
        e.git_ref.as_ref().map(|r| r.as_str()),
        Some("refs/heads/main")
    );

    // …and through curl, with the bearer token; a wrong token is refused.
    wait_until(Duration::from_secs(10), "the notify endpoint", || {
        let up = std::net::TcpStream::connect(("127.0.0.1", notify_port)).is_ok();
        async move { up.then_some(()) }
    })
    .await?;
    let curl = |auth: &str| -> anyhow::Result<String> {
        let out = std::process::Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-H"])
            .arg(format!("Authorization: Bearer {auth}"))
            .args([
                "-d",
                "status=started",
                "-d",
                "job=shop-build",
                "-d",
                "build_number=44",
                "-d",
            ])
            .arg(format!("commit={sha}"))
            .arg(format!("http://127.0.0.1:{notify_port}/notify"))
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    assert_eq!(curl("wrong")?, "401");
    assert_eq!(curl(token)?, "202");
    let e = next_build(&mut tap).await?;
    assert_eq!((e.status, e.build_number), (BuildStatus::Started, Some(44)));
    tap.expect_silence(Duration::from_millis(500)).await?;
    Ok(())
}
