//! ed25519 signing of commands, key files and the trust set.
//!
//! The signature covers [`SIGNING_CONTEXT`] followed by the exact payload bytes that travel
//! in the message, and is checked with `verify_strict` (no malleable or small-order
//! signatures). Keys are named by a `key_id`, so a new key can be trusted before the old
//! one is retired.
//!
//! Key files are one line each: `convoy-ed25519-secret <key_id> <base64 seed>` (mode 0600)
//! and `convoy-ed25519-public <key_id> <base64 key>`.

use crate::command::{Command, SignedCommand};
use crate::envelope::{Body, Message};
use crate::names::HostName;
use crate::rejection::{Rejection, RejectionCode};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use chrono::{DateTime, Utc};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Prefixed to the payload before signing, so a convoy signature can never be replayed as a
/// signature over some other protocol's bytes.
pub const SIGNING_CONTEXT: &[u8] = b"convoy-command-v1\n";

/// The longest validity window a host accepts for a command (`expires_at - issued_at`).
/// Whatever remembers command ids to recognise a replay must remember them at least this
/// long (plus the allowed clock skew on either side).
pub const MAX_COMMAND_VALIDITY: chrono::TimeDelta = chrono::TimeDelta::days(7);

const SECRET_TAG: &str = "convoy-ed25519-secret";
const PUBLIC_TAG: &str = "convoy-ed25519-public";

/// Errors reading, writing or generating keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot write key file {path}: {source} (an existing key is never overwritten; move it away first)"
    )]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the trusted keys directory {path}: {source}")]
    ReadDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{first} and {second} both carry key id {key_id:?}, and a key id must name exactly one key"
    )]
    DuplicateKeyId {
        key_id: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("{path} is not a convoy key file: {why}")]
    Format { path: PathBuf, why: String },
    #[error(
        "secret key {path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}`"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("invalid key id {0:?}: use 1 to 64 letters, digits, '.', '_' or '-'")]
    KeyId(String),
    #[error("the operating system's random generator failed: {0}")]
    Random(String),
}

fn check_key_id(id: &str) -> Result<(), KeyError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && !id.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(KeyError::KeyId(id.to_owned()))
    }
}

/// A signing key with its id: what the conductor and the CLI sign commands with.
pub struct KeyPair {
    key_id: String,
    key: SigningKey,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl KeyPair {
    /// A fresh key from the operating system's random generator.
    pub fn generate(key_id: &str) -> Result<Self, KeyError> {
        check_key_id(key_id)?;
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(Self {
            key_id: key_id.to_owned(),
            key: SigningKey::from_bytes(&seed),
        })
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// Writes `<dir>/<key_id>.key` (mode 0600) and `<dir>/<key_id>.pub`, refusing to
    /// overwrite either. Returns both paths.
    pub fn write_files(&self, dir: &Path) -> Result<(PathBuf, PathBuf), KeyError> {
        let secret = dir.join(format!("{}.key", self.key_id));
        let public = dir.join(format!("{}.pub", self.key_id));
        let seed = B64.encode(self.key.to_bytes());
        write_new(
            &secret,
            &format!("{SECRET_TAG} {} {seed}\n", self.key_id),
            0o600,
        )?;
        write_new(&public, &self.public_line(), 0o644)?;
        Ok((secret, public))
    }

    /// The public key file's one line.
    pub fn public_line(&self) -> String {
        format!(
            "{PUBLIC_TAG} {} {}\n",
            self.key_id,
            B64.encode(self.verifying_key().to_bytes())
        )
    }

    /// Reads a secret key file, refusing one that others can read.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        use std::os::unix::fs::PermissionsExt;
        let meta = fs::metadata(path).map_err(|source| KeyError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions {
                path: path.to_owned(),
                mode,
            });
        }
        let (key_id, bytes) = read_key_line(path, SECRET_TAG)?;
        Ok(Self {
            key_id,
            key: SigningKey::from_bytes(&bytes),
        })
    }

    /// Signs a command: serialises it once and signs exactly those bytes.
    pub fn sign(&self, command: &Command) -> SignedCommand {
        // Serialising a Command cannot fail: every field is a plain value.
        self.sign_payload(serde_json::to_string(command).unwrap_or_default())
    }

    /// Signs payload bytes as they are (tools and tests that craft payloads by hand).
    pub fn sign_payload(&self, payload: String) -> SignedCommand {
        let mut signed = Vec::with_capacity(SIGNING_CONTEXT.len() + payload.len());
        signed.extend_from_slice(SIGNING_CONTEXT);
        signed.extend_from_slice(payload.as_bytes());
        let sig = self.key.sign(&signed);
        SignedCommand {
            key_id: self.key_id.clone(),
            sig: B64.encode(sig.to_bytes()),
            payload,
        }
    }

    /// The message that carries a signed command; its id is the command's id.
    pub fn command_message(&self, from: impl Into<String>, command: &Command) -> Message {
        Message::with_id(command.id, from, Body::Command(self.sign(command)))
    }
}

fn write_new(path: &Path, text: &str, mode: u32) -> Result<(), KeyError> {
    let write = || -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()
    };
    write().map_err(|source| KeyError::Write {
        path: path.to_owned(),
        source,
    })
}

fn read_key_line(path: &Path, tag: &str) -> Result<(String, [u8; 32]), KeyError> {
    let text = fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: path.to_owned(),
        source,
    })?;
    let format = |why: &str| KeyError::Format {
        path: path.to_owned(),
        why: why.to_owned(),
    };
    let mut words = text.split_whitespace();
    if words.next() != Some(tag) {
        return Err(format(&format!("expected it to start with {tag:?}")));
    }
    let key_id = words.next().ok_or_else(|| format("no key id"))?.to_owned();
    check_key_id(&key_id).map_err(|e| format(&e.to_string()))?;
    let b64 = words.next().ok_or_else(|| format("no key material"))?;
    let bytes = B64
        .decode(b64)
        .map_err(|e| format(&format!("key is not base64: {e}")))?;
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|_| format("key is not 32 bytes"))?;
    Ok((key_id, bytes))
}

/// The public keys an agent accepts commands from, by key id.
#[derive(Clone, Debug, Default)]
pub struct TrustSet {
    keys: BTreeMap<String, VerifyingKey>,
}

impl TrustSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts `key` under `key_id`. Weak (small-order) keys are refused.
    pub fn insert(&mut self, key_id: &str, key: VerifyingKey) -> Result<(), Rejection> {
        if key.is_weak() {
            return Err(Rejection::new(
                RejectionCode::WeakKey,
                format!("key {key_id:?} is a weak (small-order) key and cannot be trusted"),
            ));
        }
        self.keys.insert(key_id.to_owned(), key);
        Ok(())
    }

    /// Reads one public key file.
    pub fn insert_file(&mut self, path: &Path) -> Result<String, KeyError> {
        let (key_id, bytes) = read_key_line(path, PUBLIC_TAG)?;
        let key = VerifyingKey::from_bytes(&bytes).map_err(|e| KeyError::Format {
            path: path.to_owned(),
            why: format!("not an ed25519 public key: {e}"),
        })?;
        self.insert(&key_id, key).map_err(|r| KeyError::Format {
            path: path.to_owned(),
            why: r.detail,
        })?;
        Ok(key_id)
    }

    /// Trusts every `*.pub` file in `dir`. Two files carrying the same key id are refused:
    /// which of them a signature is checked against must not depend on file names.
    pub fn load_dir(dir: &Path) -> Result<Self, KeyError> {
        let read_err = |source| KeyError::ReadDir {
            path: dir.to_owned(),
            source,
        };
        let mut set = Self::new();
        let mut paths = Vec::new();
        for entry in fs::read_dir(dir).map_err(read_err)? {
            let path = entry.map_err(read_err)?.path();
            if path.extension().is_some_and(|x| x == "pub") {
                paths.push(path);
            }
        }
        paths.sort();
        let mut seen: BTreeMap<String, PathBuf> = BTreeMap::new();
        for path in paths {
            let key_id = set.insert_file(&path)?;
            if let Some(first) = seen.insert(key_id.clone(), path.clone()) {
                return Err(KeyError::DuplicateKeyId {
                    key_id,
                    first,
                    second: path,
                });
            }
        }
        Ok(set)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    /// Checks the signature of a signed command and parses the payload it covers.
    /// Does not check addressing or time: see [`CommandVerifier`].
    pub fn open(&self, signed: &SignedCommand) -> Result<Command, Rejection> {
        let key = self.keys.get(&signed.key_id).ok_or_else(|| {
            Rejection::new(
                RejectionCode::UnknownKey,
                format!(
                    "signed by key {:?}, which this host does not trust",
                    truncate(&signed.key_id)
                ),
            )
        })?;
        let sig = B64
            .decode(&signed.sig)
            .ok()
            .and_then(|b| <[u8; 64]>::try_from(b).ok())
            .map(|b| Signature::from_bytes(&b))
            .ok_or_else(|| {
                Rejection::new(
                    RejectionCode::BadSignature,
                    "signature is not 64 bytes of base64",
                )
            })?;
        let mut bytes = Vec::with_capacity(SIGNING_CONTEXT.len() + signed.payload.len());
        bytes.extend_from_slice(SIGNING_CONTEXT);
        bytes.extend_from_slice(signed.payload.as_bytes());
        key.verify_strict(&bytes, &sig).map_err(|_| {
            Rejection::new(
                RejectionCode::BadSignature,
                format!(
                    "signature does not verify with key {:?}",
                    truncate(&signed.key_id)
                ),
            )
        })?;
        serde_json::from_str(&signed.payload).map_err(|e| {
            let code = if e.is_data() {
                RejectionCode::InvalidField
            } else {
                RejectionCode::Malformed
            };
            Rejection::new(code, format!("signed payload: {e}"))
        })
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// Everything an agent checks before it acts on a command, except replay (which needs the
/// agent's journal): trusted signature, envelope id = command id, addressed to this host,
/// inside its validity window give or take the allowed clock skew.
#[derive(Clone, Debug)]
pub struct CommandVerifier {
    pub trust: TrustSet,
    pub host: HostName,
    /// How far the signer's clock may be off from ours.
    pub max_skew: chrono::Duration,
    /// The longest validity window accepted: beyond the journal's memory a command could
    /// otherwise run twice.
    pub max_validity: chrono::Duration,
}

impl CommandVerifier {
    pub fn new(trust: TrustSet, host: HostName) -> Self {
        Self {
            trust,
            host,
            max_skew: chrono::Duration::seconds(120),
            max_validity: MAX_COMMAND_VALIDITY,
        }
    }

    /// Everything: [`Self::verify_signed`] and [`Self::check_window`].
    pub fn verify(&self, message: &Message, now: DateTime<Utc>) -> Result<Command, Rejection> {
        let command = self.verify_signed(message)?;
        self.check_window(&command, now)?;
        Ok(command)
    }

    /// What makes a command this host's to obey, whenever it arrives: a trusted signature,
    /// envelope id = command id, addressed here. A command re-sent after its window closed
    /// passes this (so the agent can answer it from its journal) but not the window check.
    pub fn verify_signed(&self, message: &Message) -> Result<Command, Rejection> {
        let Body::Command(signed) = &message.body else {
            return Err(Rejection::new(
                RejectionCode::Unexpected,
                format!("a {} message on a command queue", message.kind()),
            ));
        };
        let command = self.trust.open(signed)?;
        if command.id != message.id {
            return Err(Rejection::new(
                RejectionCode::InvalidField,
                format!(
                    "envelope id {} differs from the signed command id {}",
                    message.id, command.id
                ),
            ));
        }
        if command.host != self.host {
            return Err(Rejection::new(
                RejectionCode::WrongHost,
                format!(
                    "addressed to host {:?}, this is {:?}",
                    command.host.as_str(),
                    self.host.as_str()
                ),
            ));
        }
        check_label("issuer", &command.issuer)?;
        if let Some(rollout) = &command.rollout {
            check_label("rollout", rollout)?;
        }
        Ok(command)
    }

    /// The validity window: not expired, not issued in the future (both ± the allowed
    /// skew), and not longer than `max_validity`.
    pub fn check_window(&self, command: &Command, now: DateTime<Utc>) -> Result<(), Rejection> {
        let validity = command.expires_at - command.issued_at;
        if validity > self.max_validity {
            return Err(Rejection::new(
                RejectionCode::InvalidField,
                format!(
                    "valid for {} s, longer than the {} s this host accepts",
                    validity.num_seconds(),
                    self.max_validity.num_seconds()
                ),
            ));
        }
        if now > command.expires_at + self.max_skew {
            return Err(Rejection::new(
                RejectionCode::Expired,
                format!(
                    "expired at {} (now {}, allowed skew {} s)",
                    command.expires_at.to_rfc3339(),
                    now.to_rfc3339(),
                    self.max_skew.num_seconds()
                ),
            ));
        }
        if command.issued_at > now + self.max_skew {
            return Err(Rejection::new(
                RejectionCode::NotYetValid,
                format!(
                    "issued at {}, in the future (now {}, allowed skew {} s): check the clocks",
                    command.issued_at.to_rfc3339(),
                    now.to_rfc3339(),
                    self.max_skew.num_seconds()
                ),
            ));
        }
        Ok(())
    }
}

/// A free-text field of a command that reaches hooks as an environment variable (`issuer`,
/// `rollout`): at most 256 bytes, no control characters (a NUL would keep every hook from
/// starting, the revert's restart included).
fn check_label(field: &str, value: &str) -> Result<(), Rejection> {
    if value.len() > 256 || value.chars().any(char::is_control) {
        return Err(Rejection::new(
            RejectionCode::InvalidField,
            format!("{field}: at most 256 bytes without control characters"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::Action;
    use uuid::Uuid;

    fn command(host: &str, ttl_s: i64) -> Command {
        let now = Utc::now();
        Command {
            id: Uuid::now_v7(),
            host: HostName::new(host).unwrap(),
            issued_at: now,
            expires_at: now + chrono::Duration::seconds(ttl_s),
            issuer: "alice".into(),
            rollout: None,
            action: Action::Inventory,
        }
    }

    fn verifier(key: &KeyPair, host: &str) -> CommandVerifier {
        let mut trust = TrustSet::new();
        trust.insert(key.key_id(), key.verifying_key()).unwrap();
        CommandVerifier::new(trust, HostName::new(host).unwrap())
    }

    fn code(r: Result<Command, Rejection>) -> RejectionCode {
        r.unwrap_err().code
    }

    #[test]
    fn signed_commands_verify_and_round_trip_the_wire() {
        let key = KeyPair::generate("ops-1").unwrap();
        let cmd = command("web1", 60);
        let msg = key.command_message("cli@laptop", &cmd);
        let decoded = Message::decode(&msg.encode().unwrap()).unwrap();
        assert_eq!(
            verifier(&key, "web1").verify(&decoded, Utc::now()).unwrap(),
            cmd
        );
    }

    #[test]
    fn every_forgery_is_named() {
        let key = KeyPair::generate("ops-1").unwrap();
        let other = KeyPair::generate("ops-1").unwrap();
        let v = verifier(&key, "web1");
        let now = Utc::now();

        let forged = other.command_message("x", &command("web1", 60));
        assert_eq!(code(v.verify(&forged, now)), RejectionCode::BadSignature);

        let unknown = KeyPair::generate("rogue").unwrap();
        let msg = unknown.command_message("x", &command("web1", 60));
        assert_eq!(code(v.verify(&msg, now)), RejectionCode::UnknownKey);

        let msg = key.command_message("x", &command("web2", 60));
        assert_eq!(code(v.verify(&msg, now)), RejectionCode::WrongHost);

        let msg = key.command_message("x", &command("web1", -600));
        assert_eq!(code(v.verify(&msg, now)), RejectionCode::Expired);

        let mut future = command("web1", 60);
        future.issued_at = now + chrono::Duration::minutes(30);
        future.expires_at = now + chrono::Duration::minutes(40);
        let msg = key.command_message("x", &future);
        assert_eq!(code(v.verify(&msg, now)), RejectionCode::NotYetValid);

        // Payload edited after signing (retargeted to this host).
        let mut msg = key.command_message("x", &command("web2", 60));
        if let Body::Command(signed) = &mut msg.body {
            signed.payload = signed.payload.replace("web2", "web1");
        }
        assert_eq!(code(v.verify(&msg, now)), RejectionCode::BadSignature);

        // Envelope id swapped.
        let mut msg = key.command_message("x", &command("web1", 60));
        msg.id = Uuid::now_v7();
        assert_eq!(code(v.verify(&msg, now)), RejectionCode::InvalidField);
    }

    #[test]
    fn free_text_that_would_reach_hooks_is_bounded() {
        let key = KeyPair::generate("k").unwrap();
        let v = verifier(&key, "web1");
        for (issuer, rollout) in [("a\0b", None), ("alice", Some("x".repeat(300)))] {
            let mut cmd = command("web1", 60);
            cmd.issuer = issuer.into();
            cmd.rollout = rollout;
            let msg = key.command_message("x", &cmd);
            assert_eq!(
                code(v.verify(&msg, Utc::now())),
                RejectionCode::InvalidField
            );
        }
    }

    #[test]
    fn an_overlong_window_is_refused() {
        let key = KeyPair::generate("k").unwrap();
        let v = verifier(&key, "web1");
        let msg = key.command_message("x", &command("web1", 30 * 86_400));
        assert_eq!(
            code(v.verify(&msg, Utc::now())),
            RejectionCode::InvalidField
        );
        assert!(v.verify_signed(&msg).is_ok());
    }

    #[test]
    fn skew_within_allowance_is_accepted() {
        let key = KeyPair::generate("k").unwrap();
        let v = verifier(&key, "web1");
        let cmd = command("web1", 60);
        let msg = key.command_message("x", &cmd);
        // Valid for 60 s with 120 s of skew allowed: good until 180 s from now.
        assert!(
            v.verify(&msg, Utc::now() + chrono::Duration::seconds(150))
                .is_ok()
        );
        assert!(
            v.verify(&msg, Utc::now() - chrono::Duration::seconds(100))
                .is_ok()
        );
        assert_eq!(
            code(v.verify(&msg, Utc::now() + chrono::Duration::seconds(200))),
            RejectionCode::Expired
        );
    }

    #[test]
    fn weak_keys_are_refused() {
        // The identity point: a small-order key that "verifies" forged signatures.
        let mut bytes = [0u8; 32];
        bytes[0] = 1;
        let weak = VerifyingKey::from_bytes(&bytes).unwrap();
        assert_eq!(
            TrustSet::new().insert("w", weak).unwrap_err().code,
            RejectionCode::WeakKey
        );
    }

    #[test]
    fn key_files_round_trip_with_safe_modes() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = KeyPair::generate("ops-2026").unwrap();
        let (secret, public) = key.write_files(dir.path()).unwrap();
        let mode = fs::metadata(&secret).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(key.write_files(dir.path()).is_err(), "overwrote a key");
        let loaded = KeyPair::load(&secret).unwrap();
        assert_eq!(loaded.verifying_key(), key.verifying_key());
        let trust = TrustSet::load_dir(dir.path()).unwrap();
        assert_eq!(trust.key_ids().collect::<Vec<_>>(), vec!["ops-2026"]);
        assert!(public.exists());
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            KeyPair::load(&secret),
            Err(KeyError::Permissions { .. })
        ));
    }

    #[test]
    fn two_files_with_one_key_id_are_refused_naming_both() {
        let dir = tempfile::tempdir().unwrap();
        let old = KeyPair::generate("conductor").unwrap();
        let new = KeyPair::generate("conductor").unwrap();
        fs::write(dir.path().join("a-old.pub"), old.public_line()).unwrap();
        fs::write(dir.path().join("b-new.pub"), new.public_line()).unwrap();
        let err = TrustSet::load_dir(dir.path()).unwrap_err();
        assert!(matches!(err, KeyError::DuplicateKeyId { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("a-old.pub") && text.contains("b-new.pub") && text.contains("conductor"),
            "{text}"
        );
        // The same key under two names is refused too: which file counts must not matter.
        fs::write(dir.path().join("b-new.pub"), old.public_line()).unwrap();
        assert!(TrustSet::load_dir(dir.path()).is_err());
        fs::remove_file(dir.path().join("b-new.pub")).unwrap();
        assert_eq!(TrustSet::load_dir(dir.path()).unwrap().len(), 1);
    }

    #[test]
    fn an_unreadable_directory_is_named_as_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("trusted-keys");
        let err = TrustSet::load_dir(&missing).unwrap_err();
        assert!(matches!(err, KeyError::ReadDir { .. }), "{err}");
        assert!(err.to_string().contains("trusted-keys"), "{err}");
    }
}
