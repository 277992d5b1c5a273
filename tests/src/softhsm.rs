//! SoftHSM 2 tokens for tests, each in a temporary directory of its own.
//!
//! # Why tests re-execute themselves
//! SoftHSM finds its token directory through the `SOFTHSM2_CONF` environment variable, read from
//! the process environment when the module is initialised. A test must not `set_var` in the test
//! process (tests run on parallel threads and share one environment; `set_var` is also `unsafe`,
//! which the workspace forbids), and SoftHSM, once loaded, stays configured for the whole
//! process. So a test that loads SoftHSM in-process runs in a process of its own:
//! [`in_own_process`] creates the token in the parent, then re-executes the current test binary
//! (`std::env::current_exe()`) with `--exact <test> --nocapture` and `SOFTHSM2_CONF` set **on the
//! child `Command` only**; the child runs the test body against that token. The child's
//! stdout/stderr are printed by the parent (libtest shows them for a failing test) and included in
//! the failure message. This keeps every signer test in one `[[test]]` target per topic rather
//! than one target per test (which would cost a link each on a 2-core machine).
//!
//! Binaries that are their own process already (benchmarks, the signer binary) pass the token
//! through [`SoftHsmToken::configure`] on their own child command in the same way.
#![allow(clippy::panic, clippy::expect_used, clippy::unwrap_used)] // test harness: failing setup fails the test

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

/// Environment variable naming the PKCS#11 module (exported by `scripts/tools.sh`).
pub const MODULE_ENV: &str = "CASTELLAN_PKCS11_MODULE";

/// User PIN of every test token.
pub const USER_PIN: &str = "246810";
/// Security-officer PIN of every test token.
pub const SO_PIN: &str = "13579135";

const CHILD_ENV: &str = "CASTELLAN_SOFTHSM_CHILD";
const ROOT_ENV: &str = "CASTELLAN_SOFTHSM_ROOT";
const LABEL_ENV: &str = "CASTELLAN_SOFTHSM_LABEL";
/// Environment variable that carries the user PIN to a child process (tests use it as the
/// backend's `pin_env`).
pub const PIN_ENV: &str = "CASTELLAN_SOFTHSM_USER_PIN";

/// An initialised SoftHSM token with its own configuration file and token directory.
///
/// The directory is deleted when the owning value (the one made by [`SoftHsmToken::new`]) drops.
#[derive(Debug)]
pub struct SoftHsmToken {
    _dir: Option<TempDir>,
    root: PathBuf,
    label: String,
    module: PathBuf,
}

impl SoftHsmToken {
    /// Creates `<tmp>/softhsm2.conf` and `<tmp>/tokens/`, and initialises a token labelled
    /// `label` with [`SO_PIN`] and [`USER_PIN`] by running `softhsm2-util` with `SOFTHSM2_CONF`
    /// set for that child only.
    pub fn new(label: &str) -> io::Result<Self> {
        let module = module_path()?;
        let dir = tempfile::Builder::new()
            .prefix("castellan-softhsm-")
            .tempdir()?;
        let root = dir.path().to_path_buf();
        std::fs::create_dir(root.join("tokens"))?;
        std::fs::write(
            root.join("softhsm2.conf"),
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                root.join("tokens").display()
            ),
        )?;
        let token = Self {
            _dir: Some(dir),
            root,
            label: label.to_owned(),
            module,
        };
        let output = token
            .softhsm_util()
            .args(["--init-token", "--free", "--label", label])
            .args(["--so-pin", SO_PIN, "--pin", USER_PIN])
            .output()
            .map_err(|e| io::Error::other(format!("cannot run softhsm2-util: {e}")))?;
        if !output.status.success() {
            return Err(io::Error::other(format!(
                "softhsm2-util --init-token failed ({}):\n{}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        Ok(token)
    }

    /// The token a parent process configured for this (child) process with
    /// [`SoftHsmToken::configure`], if any.
    pub fn from_env() -> Option<Self> {
        let root = PathBuf::from(std::env::var_os(ROOT_ENV)?);
        let label = std::env::var(LABEL_ENV).ok()?;
        let module = module_path().ok()?;
        Some(Self {
            _dir: None,
            root,
            label,
            module,
        })
    }

    /// Sets `SOFTHSM2_CONF` and the token's description on `command` (a child process).
    pub fn configure<'c>(&self, command: &'c mut Command) -> &'c mut Command {
        command
            .env("SOFTHSM2_CONF", self.conf_path())
            .env(ROOT_ENV, &self.root)
            .env(LABEL_ENV, &self.label)
            .env(PIN_ENV, USER_PIN)
            .env(MODULE_ENV, &self.module)
    }

    /// `softhsm2-util` configured for this token.
    pub fn softhsm_util(&self) -> Command {
        let mut command = Command::new("softhsm2-util");
        command.env("SOFTHSM2_CONF", self.conf_path());
        command
    }

    /// The token's label.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The PKCS#11 module (from [`MODULE_ENV`]).
    pub fn module(&self) -> &Path {
        &self.module
    }

    /// The temporary directory holding the configuration and the tokens.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The `softhsm2.conf` of this token.
    pub fn conf_path(&self) -> PathBuf {
        self.root.join("softhsm2.conf")
    }

    /// SoftHSM's `directories.tokendir`.
    pub fn tokens_dir(&self) -> PathBuf {
        self.root.join("tokens")
    }

    /// The directory SoftHSM keeps this token's objects in (`tokens/<uuid>`).
    pub fn token_object_dir(&self) -> io::Result<PathBuf> {
        let mut dirs = std::fs::read_dir(self.tokens_dir())?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_dir());
        match (dirs.next(), dirs.next()) {
            (Some(dir), None) => Ok(dir),
            _ => Err(io::Error::other("expected exactly one token directory")),
        }
    }

    /// Writes [`USER_PIN`] to a mode-0600 file in the token's directory and returns its path.
    pub fn write_pin_file(&self) -> io::Result<PathBuf> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.root.join("user.pin");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        writeln!(file, "{USER_PIN}")?;
        Ok(path)
    }
}

/// The PKCS#11 module path from [`MODULE_ENV`]; an error telling how to run the tests when unset.
pub fn module_path() -> io::Result<PathBuf> {
    match std::env::var_os(MODULE_ENV) {
        Some(path) if !path.is_empty() => Ok(PathBuf::from(path)),
        _ => Err(io::Error::other(format!(
            "{MODULE_ENV} is not set: run the tests with scripts/test \
             (or `source scripts/tools.sh` first), which installs SoftHSM and exports it"
        ))),
    }
}

/// Runs `body` against a fresh token labelled `label`, in a child process of its own.
///
/// `test_path` is the test's path inside its test binary (for a test at the top of
/// `signer/tests/pkcs11_keys.rs`, just its function name). In the parent this creates the token,
/// re-executes the test binary for exactly that test with `SOFTHSM2_CONF` set on the child, and
/// fails — showing the child's output — unless the child ran that one test and it passed. In the
/// child it runs `body`. A missing [`MODULE_ENV`] fails the test; it never skips.
pub fn in_own_process(test_path: &str, label: &str, body: impl FnOnce(&SoftHsmToken)) {
    if std::env::var(CHILD_ENV).as_deref() == Ok(test_path) {
        let token = SoftHsmToken::from_env()
            .expect("the parent test process did not describe the SoftHSM token");
        body(&token);
        return;
    }
    let token = SoftHsmToken::new(label).unwrap_or_else(|e| panic!("{e}"));
    let exe = std::env::current_exe().expect("current_exe");
    let mut command = Command::new(exe);
    command
        .args(["--exact", test_path, "--nocapture", "--test-threads", "1"])
        .env(CHILD_ENV, test_path)
        .env_remove("RUST_TEST_THREADS");
    token.configure(&mut command);
    let output = command.output().expect("cannot re-execute the test binary");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Shown by libtest when this test fails, and always with --nocapture.
    println!(
        "---- child process for {test_path} (SOFTHSM2_CONF={}) ----",
        token.conf_path().display()
    );
    println!("{stdout}");
    eprintln!("{stderr}");
    // The child's own prints may interleave with libtest's "... ok", so check the start of the
    // test's line and the summary: exactly this one test ran, and it passed.
    let ran = stdout.contains(&format!("test {test_path} ... "))
        && stdout.contains("test result: ok. 1 passed; 0 failed");
    if !output.status.success() || !ran {
        panic!(
            "child test process for {test_path} failed ({}); its output:\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
            output.status
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn creates_and_initialises_a_private_token() {
        let token = SoftHsmToken::new("harness-self-test").unwrap();
        let conf = std::fs::read_to_string(token.conf_path()).unwrap();
        assert!(conf.contains(&format!(
            "directories.tokendir = {}",
            token.tokens_dir().display()
        )));
        assert!(token.token_object_dir().unwrap().is_dir());
        let out = token.softhsm_util().arg("--show-slots").output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("harness-self-test"), "{text}");
        let pin = token.write_pin_file().unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&pin).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let root = token.root().to_path_buf();
        drop(token);
        assert!(!root.exists(), "the token directory is removed on drop");
    }
}
