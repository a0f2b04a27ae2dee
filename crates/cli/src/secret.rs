//! Random secrets and password hashes.

use anyhow::Context;

/// `bytes` random bytes, hex: safe in URLs, TOML and shells without quoting.
pub fn random_hex(bytes: usize) -> anyhow::Result<String> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf)
        .map_err(|e| anyhow::anyhow!("the system's random number source failed: {e}"))?;
    Ok(hex::encode(buf))
}

/// An argon2id PHC string for `password`, what the conductor's `[[users]]`
/// `password_hash` holds.
pub fn hash_password(password: &str) -> anyhow::Result<String> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt)
        .map_err(|e| anyhow::anyhow!("the system's random number source failed: {e}"))?;
    let salt = SaltString::encode_b64(&salt)
        .map_err(|e| anyhow::anyhow!("encoding a salt: {e}"))
        .context("hashing a password")?;
    Ok(argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("hashing a password: {e}"))?
        .to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn hashes_verify() {
        use argon2::password_hash::{PasswordHash, PasswordVerifier};
        let hash = super::hash_password("correct horse").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        let parsed = PasswordHash::new(&hash).unwrap();
        assert!(
            argon2::Argon2::default()
                .verify_password(b"correct horse", &parsed)
                .is_ok()
        );
        assert_eq!(super::random_hex(16).unwrap().len(), 32);
    }
}
