//! Logins and sessions for the dashboard.
//!
//! Passwords are checked against the argon2 hashes in `users` (an unknown user costs the
//! same argon2 work as a known one). A session is 32 random bytes in an `HttpOnly`,
//! `SameSite=Lax` cookie; the server keeps only its SHA-256, with the user, the role, the
//! session's CSRF token and when it was last used. Sessions live in memory: a restarted
//! conductor asks everyone to log in again, which is the safe direction.

use crate::config::{Role, UserConfig};
use argon2::password_hash::{PasswordHash, PasswordVerifier};
use base64::Engine as _;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

/// The session cookie.
pub const SESSION_COOKIE: &str = "convoy_session";
/// The login form's CSRF cookie (double submit: the form and the cookie must agree).
pub const LOGIN_COOKIE: &str = "convoy_login";
/// More live sessions than this and the least recently used are dropped.
const MAX_SESSIONS: usize = 10_000;

/// A logged-in user, as a request sees it.
#[derive(Clone, Debug)]
pub struct Session {
    pub user: String,
    pub role: Role,
    /// Every form of this session carries it; every POST must present it.
    pub csrf: String,
    last_used: Instant,
}

impl Session {
    /// Whether `presented` is this session's CSRF token (constant time).
    pub fn csrf_ok(&self, presented: Option<&str>) -> bool {
        presented.is_some_and(|p| equal(p, &self.csrf))
    }
}

pub struct Sessions {
    map: Mutex<HashMap<[u8; 32], Session>>,
    idle: Duration,
}

impl Sessions {
    pub fn new(idle: Duration) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            idle,
        }
    }

    /// Opens a session; returns the cookie value.
    pub fn open(&self, user: &str, role: Role) -> String {
        let id = random_token();
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        map.retain(|_, s| now.duration_since(s.last_used) < self.idle);
        if map.len() >= MAX_SESSIONS
            && let Some(oldest) = map.iter().min_by_key(|(_, s)| s.last_used).map(|(k, _)| *k)
        {
            map.remove(&oldest);
        }
        map.insert(
            digest(&id),
            Session {
                user: user.to_owned(),
                role,
                csrf: random_token(),
                last_used: now,
            },
        );
        id
    }

    /// The session a cookie value names, if it is open; using it keeps it open.
    pub fn get(&self, cookie: &str) -> Option<Session> {
        let key = digest(cookie);
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match map.get_mut(&key) {
            Some(s) if now.duration_since(s.last_used) < self.idle => {
                s.last_used = now;
                Some(s.clone())
            }
            Some(_) => {
                map.remove(&key);
                None
            }
            None => None,
        }
    }

    pub fn close(&self, cookie: &str) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(&digest(cookie));
    }
}

/// Checks a user name and password against `users`. Blocking (argon2 is deliberately
/// slow): call it from `spawn_blocking`.
pub fn check_password(users: &[UserConfig], name: &str, password: &str) -> Option<Role> {
    let user = users.iter().find(|u| equal(&u.name, name));
    let hash = match user {
        Some(u) => u.password_hash.as_str(),
        None => dummy_hash(),
    };
    let parsed = PasswordHash::new(hash).ok()?;
    let ok = argon2::Argon2::default()
        .verify_password(password.as_bytes(), &parsed)
        .is_ok();
    match (ok, user) {
        (true, Some(u)) => Some(u.role),
        _ => None,
    }
}

/// A hash nobody's password matches, so that an unknown user name costs the same work.
fn dummy_hash() -> &'static str {
    static HASH: OnceLock<String> = OnceLock::new();
    HASH.get_or_init(|| hash_password(&random_token()).unwrap_or_default())
}

/// An argon2id PHC string for `password` (what `users[].password_hash` holds).
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let mut salt = [0u8; 16];
    fill(&mut salt);
    let salt = SaltString::encode_b64(&salt)?;
    Ok(argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

/// 32 random bytes, URL-safe base64.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    fill(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn fill(buf: &mut [u8]) {
    // The OS random source failing is not something to limp on with a weak session id.
    if let Err(e) = getrandom::fill(buf) {
        panic!("the operating system's random source failed: {e}");
    }
}

fn digest(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

/// Constant-time equality of two secrets (lengths may leak; values do not).
pub fn equal(a: &str, b: &str) -> bool {
    bool::from(digest(a).ct_eq(&digest(b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_and_sessions() {
        let hash = hash_password("correct horse").expect("hash");
        let users = vec![UserConfig {
            name: "alice".into(),
            password_hash: hash,
            role: Role::Deployer,
        }];
        assert_eq!(
            check_password(&users, "alice", "correct horse"),
            Some(Role::Deployer)
        );
        assert_eq!(check_password(&users, "alice", "wrong"), None);
        assert_eq!(check_password(&users, "bob", "correct horse"), None);

        let sessions = Sessions::new(Duration::from_secs(60));
        let cookie = sessions.open("alice", Role::Deployer);
        let s = sessions.get(&cookie).expect("open session");
        assert_eq!(s.user, "alice");
        assert!(s.csrf_ok(Some(&s.csrf)));
        assert!(!s.csrf_ok(Some("forged")));
        assert!(!s.csrf_ok(None));
        assert!(sessions.get("not-a-session").is_none());
        sessions.close(&cookie);
        assert!(sessions.get(&cookie).is_none());

        let short = Sessions::new(Duration::from_millis(1));
        let cookie = short.open("alice", Role::Viewer);
        std::thread::sleep(Duration::from_millis(5));
        assert!(short.get(&cookie).is_none(), "an idle session expires");
    }
}
