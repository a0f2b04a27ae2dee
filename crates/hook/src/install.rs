//! `convoy-hook install REPO.git`: writes `hooks/post-receive`, keeping an existing hook
//! as `hooks/post-receive.chained` and running it first with the same input.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

const MARKER: &str = "# installed by convoy-hook";

/// Installs the hook; returns what it did, for the operator.
pub fn install(
    repo: &Path,
    binary: &Path,
    name: Option<&str>,
    config: Option<&Path>,
) -> anyhow::Result<String> {
    let hooks = repo.join("hooks");
    anyhow::ensure!(
        repo.join("objects").is_dir() || repo.join(".git").is_dir(),
        "{} is not a git repository",
        repo.display()
    );
    let hooks = if repo.join(".git").is_dir() {
        repo.join(".git/hooks")
    } else {
        hooks
    };
    std::fs::create_dir_all(&hooks)?;
    let hook = hooks.join("post-receive");
    let chained = hooks.join("post-receive.chained");
    let mut note = String::new();
    if hook.exists() {
        let text = std::fs::read_to_string(&hook).unwrap_or_default();
        if text.contains(MARKER) {
            note.push_str("replaced the convoy hook already there; ");
        } else if chained.exists() {
            anyhow::bail!(
                "{} exists and {} too: merge them by hand, then run install again",
                hook.display(),
                chained.display()
            );
        } else {
            std::fs::rename(&hook, &chained)?;
            note.push_str(&format!(
                "kept the existing hook as {} (it runs first); ",
                chained.display()
            ));
        }
    }
    let quote = |p: &Path| shell_quote(&p.to_string_lossy());
    // `--config` belongs to convoy-hook itself, before the subcommand.
    let mut args = String::new();
    if let Some(config) = config {
        args.push_str(&format!("--config {} ", quote(config)));
    }
    args.push_str("post-receive");
    if let Some(name) = name {
        args.push_str(&format!(" --repo {}", shell_quote(name)));
    }
    let script = format!(
        "#!/bin/sh\n{MARKER}: announces pushes on the convoy bus. It never fails a push.\n\
input=$(cat)\n\
status=0\n\
chained=\"$(dirname \"$0\")/post-receive.chained\"\n\
if [ -x \"$chained\" ]; then\n\
  printf '%s\\n' \"$input\" | \"$chained\" \"$@\" || status=$?\n\
fi\n\
printf '%s\\n' \"$input\" | {} {args}\n\
exit $status\n",
        quote(binary)
    );
    let tmp: PathBuf = hooks.join(".post-receive.convoy-tmp");
    std::fs::write(&tmp, script)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&tmp, &hook)?;
    note.push_str(&format!("installed {}", hook.display()));
    Ok(note)
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}
