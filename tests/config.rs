//! Configuration: every fixture under tests/fixtures/config is accepted or
//! refused as it says, and every shipped example parses and validates.

use std::path::{Path, PathBuf};

use securechat::config::Config;

fn toml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

fn fixtures(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/config")
        .join(kind);
    let files = toml_files(&dir);
    assert!(
        files.len() >= 5,
        "too few {kind} fixtures in {}",
        dir.display()
    );
    files
}

#[test]
fn valid_fixtures_load() {
    for path in fixtures("valid") {
        if let Err(e) = Config::load(&path) {
            panic!("{} should be valid: {e}", path.display());
        }
    }
}

#[test]
fn invalid_fixtures_fail_with_their_expected_message() {
    for path in fixtures("invalid") {
        let text = std::fs::read_to_string(&path).unwrap();
        let expect = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect:"))
            .map(str::trim)
            .unwrap_or_else(|| panic!("{} has no `# expect:` line", path.display()));
        match Config::load(&path) {
            Ok(_) => panic!("{} should be refused", path.display()),
            Err(e) => {
                let message = e.to_string();
                assert!(
                    message.contains(expect),
                    "{}: error {message:?} does not contain {expect:?}",
                    path.display()
                );
                // Every error names the file it is about.
                assert!(
                    message.contains(path.file_name().unwrap().to_str().unwrap()),
                    "{message}"
                );
            }
        }
    }
}

#[test]
fn shipped_examples_validate() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let files = toml_files(&dir);
    assert!(!files.is_empty(), "no example configuration in config/");
    for path in files {
        if let Err(e) = Config::load(&path) {
            panic!("shipped example {} does not validate: {e}", path.display());
        }
    }
}

#[test]
fn errors_name_the_key_and_the_fix() {
    let text = r#"
[tls]
cert = "a.crt"
key = "a.key"
[auth]
[[auth.keys]]
kid = "k"
algorithm = "HS256"
[limits]
max_message_bytes = 99999999
"#;
    let config = Config::parse(text, Path::new("/etc/securechat/securechat.toml")).unwrap();
    let message = config.validate().unwrap_err().to_string();
    assert!(
        message.contains("/etc/securechat/securechat.toml"),
        "{message}"
    );
    assert!(message.contains("auth.keys[0].secret_file"), "{message}");
    assert!(message.contains("secret_env"), "{message}");
}

#[test]
fn unknown_keys_are_errors() {
    let text = r#"
[tls]
cert = "a.crt"
key = "a.key"
certificate = "typo.crt"
[auth]
[[auth.keys]]
kid = "k"
algorithm = "HS256"
secret_env = "X"
"#;
    let message = Config::parse(text, Path::new("s.toml"))
        .unwrap_err()
        .to_string();
    assert!(message.contains("certificate"), "{message}");
}

/// An HS256 key whose secret file holds `secret`.
fn hmac_key(dir: &Path, secret: &str) -> securechat::config::KeyConfig {
    std::fs::write(dir.join("jwt.secret"), secret).unwrap();
    securechat::config::KeyConfig {
        kid: "k".into(),
        algorithm: securechat::config::KeyAlgorithm::HS256,
        secret_file: Some(dir.join("jwt.secret")),
        secret_env: None,
        public_key_file: None,
        private_key_file: None,
    }
}

#[test]
fn secrets_never_reach_debug_output() {
    let dir = tempfile::tempdir().unwrap();
    let secret = "correct-horse-battery-staple-0123456789";
    let key = hmac_key(dir.path(), secret);
    let loaded = securechat::auth::jwt::load_secret(&key).unwrap();
    assert_eq!(loaded.expose(), secret.as_bytes());
    assert!(!format!("{loaded:?}").contains("horse"));
    let minter = securechat::auth::jwt::Minter::from_config(&key).unwrap();
    assert!(!format!("{minter:?}").contains("horse"));
}

#[test]
fn short_secrets_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = hmac_key(dir.path(), "short");
    let message = securechat::auth::jwt::load_secret(&key).unwrap_err();
    assert!(message.contains("at least 32"), "{message}");
}
