//! convoy-fetcher: keeps a bare mirror of each configured repository on this host, fetches
//! when a push event for it arrives (bursts coalesced into one fetch), catches up on start,
//! prunes deleted branches, and reports what it fetched — so hosts deploy from their own
//! mirror and a deploy does not depend on the central git server.
//!
//! # Layout
//!
//! - [`config`]: the configuration, `/etc/convoy/fetcher.toml`.
//! - the git work itself (mirror creation, fetching with bounded credentials and checked host
//!   keys) is done by the `convoy-git` helper, one process per fetch (crate `convoy-git`).
//! - [`pending`]: the durable list of push events not yet answered by a fetch.
//! - [`worker`]: the push-event handler and one fetch loop per repository.
#![forbid(unsafe_code)]

pub mod config;
pub mod pending;
pub mod worker;
