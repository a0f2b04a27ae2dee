//! convoy-git: the git work of a host — fetching a repository into its bare mirror
//! (convoy-fetcher) and exporting a signed commit from the mirror into a release
//! (convoy-agent) — done with libgit2 in `convoy-git`, a short-lived helper process.
//!
//! # Layout
//!
//! - [`protocol`]: the request a daemon sends and the reply it gets, as JSON over the
//!   helper's stdin and stdout; [`RepoConfig`], how a repository is reached.
//! - [`client`]: what the daemons call: runs the helper, kills it at a deadline.
//! - [`mirror`], [`export`]: the libgit2 work itself, run inside the helper only. The
//!   daemons link this crate for the protocol and client and never call these, so libgit2
//!   and OpenSSL do not end up in their executables.

pub mod client;
pub mod export;
pub mod mirror;
pub mod protocol;

pub use protocol::{GitError, Reply, RepoConfig, Request};
