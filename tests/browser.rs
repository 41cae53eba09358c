//! The browser client's tests, run from `cargo test`: the client library's
//! unit tests (`node --test tests/js/`) and the end-to-end browser tests
//! (`node --test tests/browser/`: headless Chromium driven by playwright-core
//! against this crate's binary). Their output is streamed as it comes.
//!
//! Without `node`, `node_modules/playwright-core` (`npm ci`) or
//! `/usr/bin/chromium`, the tests that need the missing piece say so on one
//! line and pass, unless `SECURECHAT_REQUIRE_BROWSER=1` (set by CI), which
//! makes a missing piece a failure.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_securechat");
const CHROMIUM: &str = "/usr/bin/chromium";
/// A bound on each node run; the suites themselves take well under this.
const DEADLINE: Duration = Duration::from_secs(300);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn required() -> bool {
    std::env::var("SECURECHAT_REQUIRE_BROWSER").is_ok_and(|v| v == "1")
}

/// Says (past the test harness's capture, so it shows in a normal
/// `cargo test`) why a suite is not run; fails instead when CI requires it.
fn skip(suite: &str, why: &str) {
    assert!(
        !required(),
        "{suite} cannot run: {why} (SECURECHAT_REQUIRE_BROWSER=1 requires them)"
    );
    let _ = writeln!(std::io::stderr(), "{suite}: skipped: {why}");
}

/// Whether a usable `node` (20 or later: global WebCrypto, `node:test`,
/// playwright-core's minimum) is installed; says why not otherwise.
fn node_ready(suite: &str) -> bool {
    let version = Command::new("node")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let Some(version) = version else {
        skip(
            suite,
            "`node` is not installed (Node 20 or later runs them)",
        );
        return false;
    };
    let major: u32 = version
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    if major < 20 {
        skip(
            suite,
            &format!("node {version} is too old: they need Node 20 or later"),
        );
        return false;
    }
    true
}

/// Runs `node --test DIR` in the repository with the binary under test,
/// streaming its output; fails on a failing test or after `DEADLINE`.
fn node_test(dir: &str) {
    let mut command = Command::new("node");
    command
        .args(["--test", dir])
        .current_dir(root())
        .env("SECURECHAT_BIN", BIN)
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    // Its own process group, so that a run past the deadline is stopped
    // with everything it started (servers, browsers).
    #[cfg(unix)]
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run node --test {dir}: {e}"));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for node") {
            break status;
        }
        if started.elapsed() > DEADLINE {
            #[cfg(unix)]
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.kill();
            let _ = child.wait();
            panic!("node --test {dir} did not finish within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "node --test {dir} failed: {status}");
}

#[test]
fn client_library_unit_tests() {
    if node_ready("client library tests (node --test tests/js/)") {
        node_test("tests/js/");
    }
}

#[test]
fn browser_end_to_end_tests() {
    let suite = "browser tests (node --test tests/browser/)";
    if !node_ready(suite) {
        return;
    }
    if !root()
        .join("node_modules/playwright-core/package.json")
        .is_file()
    {
        return skip(
            suite,
            "node_modules/playwright-core is missing: run `npm ci` in the repository",
        );
    }
    if !Path::new(CHROMIUM).is_file() {
        return skip(
            suite,
            &format!("{CHROMIUM} is missing: apt-get install -y --no-install-recommends chromium"),
        );
    }
    node_test("tests/browser/");
}
