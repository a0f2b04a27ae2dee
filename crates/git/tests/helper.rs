//! The `convoy-git` helper as the daemons run it: a real process, real repositories made with
//! the git CLI, and a server that stops answering.

use convoy_git::client::run_with;
use convoy_git::{GitError, Reply, RepoConfig, Request};
use convoy_message::names::{RefName, Sha};
use convoy_testkit::git::{self, git};
use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

const HELPER: &str = env!("CARGO_BIN_EXE_convoy-git");

/// An origin with tag v1, and a mirror of it made by the helper itself.
async fn mirrored(dir: &Path) -> anyhow::Result<(std::path::PathBuf, String)> {
    let origin = dir.join("origin.git");
    git::init_bare(&origin)?;
    let work = dir.join("work");
    git::init(&work)?;
    std::fs::create_dir_all(work.join("bin"))?;
    std::fs::write(work.join("bin/run"), "#!/bin/sh\necho hi\n")?;
    std::fs::set_permissions(
        work.join("bin/run"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    git(&work, &["add", "bin/run"])?;
    let sha = git::commit_file(&work, "README", "v1\n", "v1")?;
    git(&work, &["tag", "v1"])?;
    git(
        &work,
        &[
            "push",
            "-q",
            origin.to_str().unwrap_or(""),
            "main",
            "--tags",
        ],
    )?;
    let mirror = dir.join("mirror.git");
    let reply = run_with(
        Path::new(HELPER),
        &Request::Fetch {
            mirror: mirror.clone(),
            repo: RepoConfig {
                url: origin.to_string_lossy().into_owned(),
                ..RepoConfig::default()
            },
            timeout_s: 60,
        },
        Duration::from_secs(60),
    )
    .await?;
    match reply {
        Reply::Fetched { refs } => {
            assert_eq!(
                refs.get("refs/tags/v1").map(|s| s.as_str()),
                Some(sha.as_str())
            );
        }
        other => anyhow::bail!("fetch: {other:?}"),
    }
    Ok((mirror, sha))
}

fn export(mirror: &Path, git_ref: &str, commit: &str, dest: &Path) -> anyhow::Result<Request> {
    Ok(Request::Export {
        mirror: mirror.to_owned(),
        git_ref: RefName::new(git_ref)?,
        commit: Sha::new(commit)?,
        dest: dest.to_owned(),
    })
}

#[tokio::test]
async fn exports_the_signed_commit_and_refuses_a_moved_tag() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (mirror, sha) = mirrored(dir.path()).await?;
    let helper = Path::new(HELPER);
    let long = Duration::from_secs(60);

    let dest = dir.path().join("releases/one");
    let reply = run_with(helper, &export(&mirror, "refs/tags/v1", &sha, &dest)?, long).await?;
    assert_eq!(reply, Reply::Exported { fetched: false });
    assert_eq!(std::fs::read_to_string(dest.join("README"))?, "v1\n");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dest.join("bin/run"))?.permissions(),
    );
    assert_ne!(mode & 0o111, 0, "the executable bit is kept");

    // Never into an existing directory: a forced checkout would mix two trees.
    match run_with(helper, &export(&mirror, "refs/tags/v1", &sha, &dest)?, long).await? {
        Reply::Failed(GitError::Git(e)) => {
            assert!(e.contains("new directory only"), "{e}")
        }
        other => panic!("expected a refusal of an existing directory, got {other:?}"),
    }

    // The signed commit is v1's, but the tag names another commit now.
    let other = "0123456789abcdef0123456789abcdef01234567";
    let moved = dir.path().join("releases/two");
    match run_with(
        helper,
        &export(&mirror, "refs/tags/v1", other, &moved)?,
        long,
    )
    .await?
    {
        Reply::Failed(e @ GitError::RefMoved { .. }) => assert!(e.is_refusal()),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(!moved.join("README").exists());

    match run_with(
        helper,
        &export(&mirror, "refs/tags/v9", &sha, &moved)?,
        long,
    )
    .await?
    {
        Reply::Failed(GitError::RefMissing(r)) => assert_eq!(r, "refs/tags/v9"),
        other => panic!("expected a missing ref, got {other:?}"),
    }
    let nowhere = dir.path().join("no-such.git");
    match run_with(
        helper,
        &export(&nowhere, "refs/tags/v1", &sha, &moved)?,
        long,
    )
    .await?
    {
        Reply::Failed(GitError::NoMirror(p)) => assert_eq!(p, nowhere),
        other => panic!("expected no mirror, got {other:?}"),
    }
    Ok(())
}

/// A server that accepts and then says nothing: libgit2 would wait on it for good. The
/// helper is killed at the deadline, which closes its connection.
#[tokio::test]
async fn a_stuck_fetch_is_killed_at_its_deadline() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let request = Request::Fetch {
        mirror: dir.path().join("stuck.git"),
        repo: RepoConfig {
            url: format!("http://127.0.0.1:{port}/stuck.git"),
            ..RepoConfig::default()
        },
        // The helper's own bound is far away: only the kill can end it in time.
        timeout_s: 3600,
    };
    let accepted = std::thread::spawn(move || -> std::io::Result<Duration> {
        let (mut socket, _) = listener.accept()?;
        socket.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut buf = [0u8; 4096];
        // Read the request, answer nothing, and time how long until the peer goes away.
        let since = Instant::now();
        loop {
            match socket.read(&mut buf)? {
                0 => return Ok(since.elapsed()),
                _ => continue,
            }
        }
    });
    let started = Instant::now();
    let result = run_with(Path::new(HELPER), &request, Duration::from_secs(2)).await;
    match result {
        Err(GitError::Git(e)) => assert!(
            e.contains("killed at its deadline") && e.contains("raise fetch_timeout_s"),
            "{e}"
        ),
        other => panic!("expected the deadline, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(20));
    let open_for = accepted
        .join()
        .map_err(|_| anyhow::anyhow!("listener thread panicked"))??;
    assert!(
        open_for < Duration::from_secs(20),
        "the helper's connection stayed open {open_for:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_missing_or_failing_helper_is_named() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let request = export(
        &dir.path().join("m.git"),
        "refs/tags/v1",
        "0123456789abcdef0123456789abcdef01234567",
        &dir.path().join("out"),
    )?;
    let missing = dir.path().join("convoy-git");
    match run_with(&missing, &request, Duration::from_secs(10)).await {
        Err(GitError::Helper(e)) => {
            assert!(
                e.contains(&missing.display().to_string()) && e.contains("CONVOY_GIT"),
                "{e}"
            )
        }
        other => panic!("expected a helper error, got {other:?}"),
    }
    // A helper that dies without a reply.
    let dies = dir.path().join("dies");
    std::fs::write(&dies, "#!/bin/sh\nkill -9 $$\n")?;
    std::fs::set_permissions(&dies, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    match run_with(&dies, &request, Duration::from_secs(10)).await {
        Err(GitError::Helper(e)) => assert!(e.contains("killed by signal 9"), "{e}"),
        other => panic!("expected a helper error, got {other:?}"),
    }
    Ok(())
}
