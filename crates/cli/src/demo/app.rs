//! The demo's application: a static page served by `python3 -m http.server` on each host,
//! from `<app root>/current/public`, with a build step and a health check of its own in the
//! repository, as a real app would have.

use anyhow::{Context, bail};
use std::path::Path;
use std::process::Command;

/// `bin/build`: stamps the release with the commit and ref it was built from.
const BUILD: &str = r#"#!/bin/sh
# Run by convoy-agent in the new release's directory before the switch.
set -eu
printf '%s %s\n' "$CONVOY_COMMIT" "$CONVOY_REF" > public/version.txt
echo "built $CONVOY_RELEASE from ${CONVOY_REF#refs/tags/} ($CONVOY_COMMIT) on $CONVOY_HOST"
"#;

/// `bin/health`: the release is healthy when the running server serves this very commit.
const HEALTH: &str = r#"#!/bin/sh
# Run by convoy-agent after the switch; a failure switches the host back.
exec python3 - "$APP_PORT" "$CONVOY_COMMIT" <<'PY'
import sys, urllib.request
port, commit = sys.argv[1], sys.argv[2]
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/version.txt", timeout=2) as r:
        served = r.read().decode().split()[0]
except Exception as e:
    sys.exit(f"the app on port {port} does not answer: {e}")
if served != commit:
    sys.exit(f"the app on port {port} serves {served}, not {commit}")
print(f"the app on port {port} serves {commit}")
PY
"#;

fn index(version: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\">\n<head><meta charset=\"utf-8\"><title>hello {version}</title></head>\n\
<body style=\"font-family: sans-serif; margin: 4em\">\n\
<h1>Hello from convoy's demo app, {version}</h1>\n\
<p>Deployed by convoy. <a href=\"version.txt\">version.txt</a> names the commit.</p>\n\
</body>\n</html>\n"
    )
}

/// Runs git with a clean configuration (no user or system config, no signing, no hooks of
/// the caller) and `env` added; fails with its output.
pub fn git(
    git: &Path,
    dir: &Path,
    args: &[&str],
    env: &[(String, String)],
) -> anyhow::Result<String> {
    let out = super::children::clean_command(git)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "convoy demo")
        .env("GIT_AUTHOR_EMAIL", "demo@convoy.invalid")
        .env("GIT_COMMITTER_NAME", "convoy demo")
        .env("GIT_COMMITTER_EMAIL", "demo@convoy.invalid")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(args)
        .output()
        .with_context(|| format!("running git {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "git {} failed in {}: {}{}",
            args.join(" "),
            dir.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A work tree of the app with its first commit, pushing to `origin`.
pub fn create(git_bin: &Path, work: &Path, origin: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(work.join("public"))?;
    std::fs::create_dir_all(work.join("bin"))?;
    let origin = origin
        .to_str()
        .context("the demo directory's path is not UTF-8")?;
    git(git_bin, work, &["init", "-q", "--initial-branch=main"], &[])?;
    git(git_bin, work, &["remote", "add", "origin", origin], &[])?;
    // For the commits a person makes there after the demo's own.
    git(git_bin, work, &["config", "user.name", "convoy demo"], &[])?;
    git(
        git_bin,
        work,
        &["config", "user.email", "demo@convoy.invalid"],
        &[],
    )?;
    std::fs::write(work.join("bin/build"), BUILD)?;
    std::fs::write(work.join("bin/health"), HEALTH)?;
    std::fs::write(
        work.join("README"),
        "convoy's demo app: public/ is served; bin/build and bin/health run on every deploy.\n",
    )?;
    std::fs::write(work.join("public/index.html"), index("(unreleased)"))?;
    git(git_bin, work, &["add", "-A"], &[])?;
    git(git_bin, work, &["commit", "-q", "-m", "the demo app"], &[])?;
    Ok(())
}

/// Commits a page for `tag`, tags it, and pushes through the central repository's hook;
/// returns the commit.
pub fn release(git_bin: &Path, work: &Path, tag: &str) -> anyhow::Result<String> {
    std::fs::write(work.join("public/index.html"), index(tag))?;
    git(
        git_bin,
        work,
        &["commit", "-q", "-am", &format!("release {tag}")],
        &[],
    )?;
    git(git_bin, work, &["tag", tag], &[])?;
    let sha = git(git_bin, work, &["rev-parse", "HEAD"], &[])?;
    git(git_bin, work, &["push", "-q", "origin", "main", tag], &[])?;
    Ok(sha)
}

/// `<dir>/release TAG`: a new release the way a team makes one — commit, tag, push through
/// the hook — then the CI job's report that starts the pipeline.
pub fn release_script(work: &Path, ci: &Path, ci_config: &Path, log: &Path) -> String {
    format!(
        r#"#!/bin/sh
# A new release of the demo app, the way a team makes one: commit, tag, push to the central
# repository (its convoy-hook announces the push), then what the CI job reports when the
# build passes (`convoy-ci notify`), which starts the pipeline: staging, the gate, prod.
set -eu
tag=${{1:?"usage: $0 TAG, e.g. $0 v1.1.0"}}
cd {work}
sed -i -e "s|demo app, [^<]*<|demo app, $tag<|" -e "s|<title>hello [^<]*<|<title>hello $tag<|" public/index.html
git commit -q -am "release $tag"
git tag "$tag"
git push -q origin HEAD "$tag"
commit=$(git rev-parse HEAD)
build=$(git tag -l 'v*' | wc -l)
for status in started succeeded; do
  {ci} --config {config} notify "$status" --repo {APP} --job hello-build \
    --build-number "$build" --commit "$commit" --ref "refs/tags/$tag" \
    --url "http://ci.invalid/job/hello-build/$build/" >/dev/null 2>>{log}
done
echo "pushed $tag ($commit); the CI reported build #$build: the pipeline starts"
"#,
        work = shell_quote(work),
        ci = shell_quote(ci),
        config = shell_quote(ci_config),
        log = shell_quote(log),
        APP = super::fleet::APP,
    )
}

fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', "'\\''"))
}

/// Serves `<root>/current/public` on `port` (a symlink followed per request, so a switch is
/// served at once; before the first deploy the server answers 404). A `broken` app serves
/// an empty directory instead, whatever is deployed — as if its restart never took — so its
/// health check fails.
pub fn serve_command(python: &Path, root: &Path, port: u16, broken: bool) -> Command {
    let served = if broken {
        root.join("shared/not-restarted")
    } else {
        root.join("current/public")
    };
    if broken {
        let _ = std::fs::create_dir_all(&served);
    }
    let mut cmd = super::children::clean_command(python);
    cmd.args([
        "-m",
        "http.server",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--directory",
    ])
    .arg(served);
    cmd
}

/// What a host's app serves as `version.txt` (its first word: the commit), if anything.
pub fn served_commit(port: u16) -> Option<String> {
    let agent = ureq::Agent::config_builder()
        .timeout_global(Some(std::time::Duration::from_secs(2)))
        .build()
        .new_agent();
    let mut resp = agent
        .get(&format!("http://127.0.0.1:{port}/version.txt"))
        .call()
        .ok()?;
    let text = resp.body_mut().read_to_string().ok()?;
    text.split_whitespace().next().map(str::to_owned)
}
