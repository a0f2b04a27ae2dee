//! The bare mirror of one repository, and fetching it with bounded credential callbacks
//! and checked SSH host keys. Blocking (git2): call from a blocking thread.

use crate::config::RepoConfig;
use base64::Engine;
use convoy_message::names::Sha;
use git2::{
    CertificateCheckStatus, Cred, CredentialType, FetchOptions, RemoteCallbacks, Repository,
};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

const REFSPECS: [&str; 2] = ["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"];

/// Creates the bare mirror if missing, and keeps its `origin` URL as configured.
pub fn ensure(path: &Path, url: &str) -> Result<(), git2::Error> {
    let repo = match Repository::open_bare(path) {
        Ok(r) => r,
        Err(_) => Repository::init_bare(path)?,
    };
    match repo.find_remote("origin") {
        Ok(remote) => {
            if remote.url().ok() != Some(url) {
                repo.remote_set_url("origin", url)?;
            }
        }
        Err(_) => {
            repo.remote_with_fetch("origin", url, REFSPECS[0])?;
            repo.remote_add_fetch("origin", REFSPECS[1])?;
        }
    }
    Ok(())
}

/// Fetches every branch and tag, pruning deleted ones; returns the mirror's refs after.
pub fn fetch(
    path: &Path,
    config: &RepoConfig,
    deadline: Instant,
) -> Result<BTreeMap<String, Sha>, String> {
    let repo = Repository::open_bare(path)
        .map_err(|e| format!("opening mirror {}: {e}", path.display()))?;
    let mut remote = repo.find_remote("origin").map_err(|e| e.to_string())?;
    let attempts = Cell::new(0u32);
    let mut callbacks = RemoteCallbacks::new();
    callbacks.credentials(|_url, user_from_url, allowed| {
        attempts.set(attempts.get() + 1);
        if attempts.get() > 3 {
            return Err(git2::Error::from_str(
                "the server refused our credentials 3 times; check ssh_key / token_file",
            ));
        }
        credentials(config, user_from_url, allowed)
    });
    callbacks.certificate_check(|cert, host| match cert.as_hostkey() {
        Some(hostkey) => check_host_key(config, host, hostkey.hostkey()),
        // TLS certificates: libgit2 verifies them against the system's CAs.
        None => Ok(CertificateCheckStatus::CertificatePassthrough),
    });
    callbacks.transfer_progress(|_| Instant::now() < deadline);
    callbacks.sideband_progress(|_| Instant::now() < deadline);
    let mut options = FetchOptions::new();
    options
        .remote_callbacks(callbacks)
        .prune(git2::FetchPrune::On)
        .download_tags(git2::AutotagOption::None);
    remote
        .fetch(&REFSPECS, Some(&mut options), Some("convoy-fetcher"))
        .map_err(|e| {
            if Instant::now() >= deadline {
                "fetch abandoned at its deadline (fetch_timeout_s)".to_owned()
            } else {
                e.message().to_owned()
            }
        })?;
    refs(&repo).map_err(|e| e.to_string())
}

/// Every branch and tag with the commit it points to.
pub fn refs(repo: &Repository) -> Result<BTreeMap<String, Sha>, git2::Error> {
    let mut out = BTreeMap::new();
    for reference in repo.references()? {
        let reference = reference?;
        let Ok(name) = reference.name() else { continue };
        if !(name.starts_with("refs/heads/") || name.starts_with("refs/tags/")) {
            continue;
        }
        if let Ok(commit) = reference.peel_to_commit()
            && let Ok(sha) = Sha::new(commit.id().to_string())
        {
            out.insert(name.to_owned(), sha);
        }
    }
    Ok(out)
}

fn credentials(
    config: &RepoConfig,
    user_from_url: Option<&str>,
    allowed: CredentialType,
) -> Result<Cred, git2::Error> {
    if allowed.contains(CredentialType::SSH_KEY)
        && let Some(key) = &config.ssh_key
    {
        let user = user_from_url
            .or(config.ssh_user.as_deref())
            .unwrap_or("git");
        return Cred::ssh_key(user, None, key, None);
    }
    if allowed.contains(CredentialType::USER_PASS_PLAINTEXT)
        && let Some(file) = &config.token_file
    {
        let token = std::fs::read_to_string(file).map_err(|e| {
            git2::Error::from_str(&format!("reading token_file {}: {e}", file.display()))
        })?;
        let user = config.token_user.as_deref().unwrap_or("x-access-token");
        return Cred::userpass_plaintext(user, token.trim());
    }
    if allowed.contains(CredentialType::USERNAME) {
        return Cred::username(
            user_from_url
                .or(config.ssh_user.as_deref())
                .unwrap_or("git"),
        );
    }
    Err(git2::Error::from_str(
        "the server wants credentials and none are configured for this repository (ssh_key or token_file)",
    ))
}

fn check_host_key(
    config: &RepoConfig,
    host: &str,
    key: Option<&[u8]>,
) -> Result<CertificateCheckStatus, git2::Error> {
    let refuse = |why: String| Err(git2::Error::from_str(&why));
    let Some(key) = key else {
        return refuse(format!("{host} sent no host key"));
    };
    let Some(path) = &config.known_hosts else {
        return refuse(format!(
            "no known_hosts configured: refusing {host}'s unverified host key"
        ));
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        git2::Error::from_str(&format!("reading known_hosts {}: {e}", path.display()))
    })?;
    if known(&text, host, key) {
        Ok(CertificateCheckStatus::CertificateOk)
    } else {
        use base64::Engine;
        tracing::warn!(host, key = %base64::engine::general_purpose::STANDARD.encode(key),
            known_hosts = %path.display(), "host key not in known_hosts; refusing");
        refuse(format!(
            "{host}'s host key is not in {}; refusing to fetch",
            path.display()
        ))
    }
}

/// Whether `known_hosts` lists `key` for `host` (plain entries; `[host]:port` accepted).
pub fn known(known_hosts: &str, host: &str, key: &[u8]) -> bool {
    known_hosts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let (Some(hosts), Some(_kind), Some(b64)) = (fields.next(), fields.next(), fields.next())
        else {
            return false;
        };
        let names_host = hosts.split(',').any(|h| {
            let h = h
                .strip_prefix('[')
                .and_then(|h| h.split(']').next())
                .unwrap_or(h);
            h == host
        });
        names_host
            && base64::engine::general_purpose::STANDARD
                .decode(b64)
                .is_ok_and(|k| k == key)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn known_hosts_matching() {
        let key = b"raw-key-bytes";
        let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, key);
        let file = format!(
            "# comment\ngit.example.com,10.0.0.1 ssh-ed25519 {b64}\n[other]:2222 ssh-ed25519 {b64}\n"
        );
        assert!(super::known(&file, "git.example.com", key));
        assert!(super::known(&file, "other", key));
        assert!(!super::known(&file, "evil.example.com", key));
        assert!(!super::known(&file, "git.example.com", b"another-key"));
    }
}
