//! The commands that work without a conductor: keygen and token.

use std::process::Command;

const CONVOY: &str = env!("CARGO_BIN_EXE_convoy");

#[test]
fn keygen_writes_a_key_pair_hosts_can_trust() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let out = Command::new(CONVOY)
        .args(["keygen", "--id", "conductor-2026", "--out"])
        .arg(dir.path())
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = convoy_message::KeyPair::load(&dir.path().join("conductor-2026.key"))?;
    assert_eq!(key.key_id(), "conductor-2026");
    let trust = convoy_message::TrustSet::load_dir(dir.path())?;
    assert_eq!(trust.key_ids().collect::<Vec<_>>(), vec!["conductor-2026"]);
    // Never overwrites an existing key.
    let again = Command::new(CONVOY)
        .args(["keygen", "--id", "conductor-2026", "--out"])
        .arg(dir.path())
        .output()?;
    assert_eq!(
        again.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&again.stdout)
    );
    Ok(())
}

#[test]
fn token_prints_a_token_and_its_hash_for_the_config() -> anyhow::Result<()> {
    let out = Command::new(CONVOY)
        .args(["token", "--name", "ci", "--json"])
        .output()?;
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let token = v["token"].as_str().unwrap_or_default();
    assert!(token.len() >= 32, "{v}");
    use sha2::Digest;
    assert_eq!(
        v["sha256"],
        hex::encode(sha2::Sha256::digest(token.as_bytes()))
    );
    Ok(())
}

#[test]
fn without_a_token_the_cli_says_how_to_give_one() -> anyhow::Result<()> {
    let out = Command::new(CONVOY)
        .env_remove("CONVOY_TOKEN")
        .args(["status"])
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("CONVOY_TOKEN"));
    Ok(())
}

#[test]
fn passwd_prints_an_argon2_hash_of_the_password_for_the_users_entry() -> anyhow::Result<()> {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    use std::io::Write;
    let mut child = Command::new(CONVOY)
        .args(["passwd", "alice", "--role", "viewer"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdin"))?
        .write_all(b"correct horse battery\n")?;
    let out = child.wait_with_output()?;
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let hash = text
        .lines()
        .find_map(|l| l.strip_prefix("password_hash = \""))
        .and_then(|h| h.strip_suffix('"'))
        .ok_or_else(|| anyhow::anyhow!("no password_hash line in {text}"))?;
    assert!(text.contains("name = \"alice\"") && text.contains("role = \"viewer\""));
    let parsed = PasswordHash::new(hash).map_err(|e| anyhow::anyhow!("{e}"))?;
    assert!(
        argon2::Argon2::default()
            .verify_password(b"correct horse battery", &parsed)
            .is_ok()
    );
    // Too short a password is refused.
    let short = Command::new(CONVOY)
        .args(["passwd", "bob"])
        .stdin(std::process::Stdio::null())
        .output()?;
    assert_eq!(short.status.code(), Some(2));
    Ok(())
}
