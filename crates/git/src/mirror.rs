//! The bare mirror of one repository, and fetching it with bounded credential callbacks
//! and checked SSH host keys. Runs inside the `convoy-git` helper.

use crate::protocol::{GitError, Reply, RepoConfig};
use base64::Engine;
use convoy_message::names::Sha;
use git2::{
    CertificateCheckStatus, Cred, CredentialType, FetchOptions, RemoteCallbacks, Repository,
};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

/// The user name sent with a token when `token_user` is not set: GitHub's convention (GitLab
/// takes any name with an access token; other servers may want the account's name).
pub const DEFAULT_TOKEN_USER: &str = "x-access-token";

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

/// The helper's `fetch` request: creates the mirror if missing, then fetches it.
pub fn serve(path: &Path, config: &RepoConfig, timeout_s: u64) -> Reply {
    let deadline = Instant::now() + std::time::Duration::from_secs(timeout_s);
    let fetched = ensure(path, &config.url)
        .map_err(|e| format!("preparing the mirror: {}", e.message()))
        .and_then(|()| fetch(path, config, deadline));
    match fetched {
        Ok(refs) => Reply::Fetched { refs },
        Err(e) => Reply::Failed(GitError::Git(e)),
    }
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
            return Err(git2::Error::from_str(&refused(config, allowed)));
        }
        credentials(config, user_from_url, allowed)
    });
    callbacks.certificate_check(|cert, host| {
        if let Some(hostkey) = cert.as_hostkey() {
            return check_host_key(config, host, hostkey.hostkey());
        }
        match (cert.as_x509(), &config.tls_ca_file) {
            (Some(x509), Some(ca_file)) => check_tls_certificate(ca_file, host, x509.data()),
            // libgit2 (OpenSSL) has checked it against the system's CAs: keep its verdict.
            _ => Ok(CertificateCheckStatus::CertificatePassthrough),
        }
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
            } else if e.code() == git2::ErrorCode::Auth
                && let Some(key) = &config.ssh_key
            {
                // libssh2 gives up by itself after a refused key, without naming it.
                format!("{} (ssh_key {})", e.message(), key.display())
            } else if e.class() == git2::ErrorClass::Ssl
                && e.message().contains("certificate")
                && config.tls_ca_file.is_none()
            {
                // libgit2's words ("the SSL certificate is invalid") do not say against what.
                format!(
                    "{} (checked against the system's CAs; for a server with a private CA set tls_ca_file)",
                    e.message()
                )
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
        let user = config.token_user.as_deref().unwrap_or(DEFAULT_TOKEN_USER);
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

/// Why the fetch gives up after the server refused what the credential callback offered.
fn refused(config: &RepoConfig, allowed: CredentialType) -> String {
    match (&config.ssh_key, &config.token_file) {
        (Some(key), _) if allowed.contains(CredentialType::SSH_KEY) => format!(
            "the server kept refusing ssh_key {}; check that it is a deploy key the server accepts",
            key.display()
        ),
        (_, Some(file)) if allowed.contains(CredentialType::USER_PASS_PLAINTEXT) => format!(
            "the server kept refusing the token in token_file {} (sent as user {}); check the token and token_user",
            file.display(),
            config.token_user.as_deref().unwrap_or(DEFAULT_TOKEN_USER)
        ),
        _ => "the server kept refusing our credentials; check ssh_key / token_file".to_owned(),
    }
}

/// Checks a server's TLS certificate against `tls_ca_file` alone (the system's CAs are not
/// consulted): it must chain to one of the file's certificates and name `host`. libgit2
/// hands over only the server's own certificate, so an intermediate CA that signed it must be
/// in the file too.
fn check_tls_certificate(
    ca_file: &Path,
    host: &str,
    der: &[u8],
) -> Result<CertificateCheckStatus, git2::Error> {
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    let fail = |why: String| git2::Error::from_str(&why);
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_file)
        .map_err(|e| fail(format!("reading tls_ca_file {}: {e}", ca_file.display())))?;
    for cert in certs {
        let cert =
            cert.map_err(|e| fail(format!("reading tls_ca_file {}: {e}", ca_file.display())))?;
        roots
            .add(cert)
            .map_err(|e| fail(format!("tls_ca_file {}: {e}", ca_file.display())))?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots.into(), provider)
            .build()
            .map_err(|e| fail(format!("tls_ca_file {}: {e}", ca_file.display())))?;
    let name = ServerName::try_from(host).map_err(|e| {
        fail(format!(
            "{host} is not a name a certificate can be checked for: {e}"
        ))
    })?;
    match verifier.verify_server_cert(&CertificateDer::from(der), &[], &name, &[], UnixTime::now())
    {
        Ok(_) => Ok(CertificateCheckStatus::CertificateOk),
        Err(e) => Err(fail(format!(
            "{host}'s TLS certificate is not trusted by tls_ca_file {}: {e}; refusing to fetch",
            ca_file.display()
        ))),
    }
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
        refuse(format!(
            "{host}'s host key ({}) is not in {}; refusing to fetch",
            base64::engine::general_purpose::STANDARD.encode(key),
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
