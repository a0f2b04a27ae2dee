//! What the daemons ask `convoy-git` and what it answers: one JSON request on its stdin, one
//! JSON reply on its stdout.

use convoy_message::names::{RefName, Sha};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// One mirrored repository and how to reach it (`[repos.<name>]` of fetcher.toml).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RepoConfig {
    /// `ssh://git@host/repo.git`, `https://host/repo.git`, or a local path.
    pub url: String,
    /// SSH private key for `ssh://` URLs.
    pub ssh_key: Option<PathBuf>,
    /// SSH user when the URL names none (default `git`).
    pub ssh_user: Option<String>,
    /// A file holding an HTTPS access token.
    pub token_file: Option<PathBuf>,
    /// The user name sent with the token (default `x-access-token`).
    pub token_user: Option<String>,
    /// PEM certificates of the CA(s) that sign the `https://` server's certificate (the
    /// intermediate, if one signs it). When set, only these are trusted for this repo; when
    /// not, the system's CAs are (and a file named by `SSL_CERT_FILE`).
    pub tls_ca_file: Option<PathBuf>,
    /// Accepted SSH host keys, OpenSSH `known_hosts` format (unhashed entries). Required for
    /// `ssh://` URLs: an unknown host key is refused.
    pub known_hosts: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Create the bare mirror if missing and fetch every branch and tag into it, pruning.
    Fetch {
        mirror: PathBuf,
        repo: RepoConfig,
        /// Seconds; the helper gives up by itself at this point (and is killed a little
        /// after, should it not).
        timeout_s: u64,
    },
    /// Check that `git_ref` still resolves to `commit` in the mirror (fetching once from its
    /// `origin` if not), then write the commit's tree into `dest`, which must not exist.
    Export {
        mirror: PathBuf,
        git_ref: RefName,
        commit: Sha,
        dest: PathBuf,
    },
}

impl Request {
    /// A short name for logs and errors.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Fetch { .. } => "fetch",
            Request::Export { .. } => "export",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Reply {
    /// The mirror's branches and tags after the fetch.
    Fetched {
        refs: BTreeMap<String, Sha>,
    },
    /// The release was written; `fetched` when the mirror had to be fetched first.
    Exported {
        fetched: bool,
    },
    Failed(GitError),
}

/// Why a git operation failed.
#[derive(Clone, Debug, PartialEq, thiserror::Error, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GitError {
    #[error("no mirror at {} (is convoy-fetcher configured for this repository?)", .0.display())]
    NoMirror(PathBuf),
    #[error(
        "{git_ref} resolves to {found} in the mirror, not to the signed commit {expected}; refusing (a tag moved after signing?)"
    )]
    RefMoved {
        git_ref: String,
        expected: String,
        found: String,
    },
    #[error("{0} is not in the mirror, even after a fetch")]
    RefMissing(String),
    /// libgit2's own words, or what went wrong around it (the destination, the deadline).
    #[error("git: {0}")]
    Git(String),
    /// The helper could not be run, was killed, or answered nonsense.
    #[error("convoy-git: {0}")]
    Helper(String),
}

impl GitError {
    /// True when the command was refused for what it asked, not failed by the host.
    pub fn is_refusal(&self) -> bool {
        matches!(self, GitError::RefMoved { .. } | GitError::RefMissing(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_round_trip() {
        let request = Request::Export {
            mirror: "/var/lib/convoy/mirrors/web.git".into(),
            git_ref: RefName::new("refs/tags/v1").unwrap(),
            commit: Sha::new("0123456789012345678901234567890123456789").unwrap(),
            dest: "/srv/web/releases/x".into(),
        };
        let text = serde_json::to_string(&request).unwrap();
        assert!(text.contains(r#""op":"export""#), "{text}");
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), request);
        for reply in [
            Reply::Exported { fetched: true },
            Reply::Failed(GitError::RefMoved {
                git_ref: "refs/tags/v1".into(),
                expected: "a".into(),
                found: "b".into(),
            }),
            Reply::Failed(GitError::NoMirror("/m".into())),
        ] {
            let text = serde_json::to_string(&reply).unwrap();
            assert_eq!(serde_json::from_str::<Reply>(&text).unwrap(), reply);
        }
    }
}
