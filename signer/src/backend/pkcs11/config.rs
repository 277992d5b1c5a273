//! Configuration of the PKCS#11 backend and reading its user PIN.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::backend::BackendError;
use crate::backend::device_duration as deserialize_duration;

/// Most worker sessions a pool may have (a token serves a handful of parallel operations at best).
pub const MAX_SESSIONS: usize = 64;

/// Configuration of a [`super::Pkcs11Backend`], as embedded in `signer.toml`:
///
/// ```toml
/// module = "/usr/lib/softhsm/libsofthsm2.so"
/// token_label = "castellan"
/// pin_file = "/etc/castellan/token.pin"   # or: pin_env = "CASTELLAN_TOKEN_PIN"
/// sessions = 2                            # worker threads, one session each
/// sign_timeout = "2s"                     # "250ms", "2s", "1m"
/// ```
///
/// # Security
/// The configuration names where the user PIN is, never the PIN itself; the PIN is read at
/// [`super::Pkcs11Backend::open`] into a zeroizing [`SecretString`]. The token is found by its
/// label, never by slot index (slot ids change when tokens are initialised or re-plugged).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Config {
    /// Path of the PKCS#11 module (shared library) to load.
    pub module: PathBuf,
    /// `CKA_LABEL` of the token (the label given at `C_InitToken`).
    pub token_label: String,
    /// File holding the user PIN (one line; must not be readable by group or others).
    #[serde(default)]
    pub pin_file: Option<PathBuf>,
    /// Environment variable holding the user PIN.
    #[serde(default)]
    pub pin_env: Option<String>,
    /// Number of worker threads, each owning one session.
    #[serde(default = "default_sessions")]
    pub sessions: usize,
    /// Deadline of one signing request, queueing included.
    #[serde(
        default = "default_sign_timeout",
        deserialize_with = "deserialize_duration"
    )]
    pub sign_timeout: Duration,
}

impl Pkcs11Config {
    /// A configuration with the default pool size and timeout.
    pub fn new(module: impl Into<PathBuf>, token_label: impl Into<String>, pin: PinSource) -> Self {
        let (pin_file, pin_env) = match pin {
            PinSource::File(path) => (Some(path), None),
            PinSource::Env(var) => (None, Some(var)),
        };
        Self {
            module: module.into(),
            token_label: token_label.into(),
            pin_file,
            pin_env,
            sessions: default_sessions(),
            sign_timeout: default_sign_timeout(),
        }
    }

    /// Where the user PIN comes from; an error unless exactly one of `pin_file` and `pin_env` is
    /// set.
    pub fn pin_source(&self) -> Result<PinSource, BackendError> {
        match (&self.pin_file, &self.pin_env) {
            (Some(path), None) => Ok(PinSource::File(path.clone())),
            (None, Some(var)) => Ok(PinSource::Env(var.clone())),
            _ => Err(BackendError::PinSource(
                "exactly one of pin_file and pin_env must be set".into(),
            )),
        }
    }

    /// Checks the values that serde cannot (pool size, timeout, PIN source).
    pub fn validate(&self) -> Result<(), BackendError> {
        if self.token_label.is_empty() || self.token_label.len() > 32 {
            // CK_TOKEN_INFO.label is 32 bytes, blank-padded.
            return Err(BackendError::TokenNotFound(format!(
                "{} (a token label is 1 to 32 bytes)",
                self.token_label
            )));
        }
        if self.sessions == 0 || self.sessions > MAX_SESSIONS {
            return Err(BackendError::Unavailable(format!(
                "sessions must be between 1 and {MAX_SESSIONS}, not {}",
                self.sessions
            )));
        }
        if self.sign_timeout.is_zero() {
            return Err(BackendError::Unavailable(
                "sign_timeout must not be zero".into(),
            ));
        }
        self.pin_source().map(|_| ())
    }
}

impl fmt::Debug for Pkcs11Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Config")
            .field("module", &self.module)
            .field("token_label", &self.token_label)
            .field("pin_file", &self.pin_file)
            .field("pin_env", &self.pin_env)
            .field("sessions", &self.sessions)
            .field("sign_timeout", &self.sign_timeout)
            .finish_non_exhaustive()
    }
}

/// Where the user PIN is read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinSource {
    /// A file (mode 0600 or stricter) whose first line is the PIN.
    File(PathBuf),
    /// An environment variable.
    Env(String),
}

impl PinSource {
    /// Reads the PIN.
    ///
    /// # Security
    /// The PIN is held only in zeroizing buffers; error messages name the source, never the value.
    pub fn read(&self) -> Result<SecretString, BackendError> {
        match self {
            Self::File(path) => read_pin_file(path),
            Self::Env(var) => {
                let value = Zeroizing::new(std::env::var(var).map_err(|_| {
                    BackendError::PinSource(format!(
                        "environment variable {var} is not set or not UTF-8"
                    ))
                })?);
                pin_from_text(&value, &format!("environment variable {var}"))
            }
        }
    }
}

/// The token label and user PIN the pool logs in with.
///
/// # Security
/// Holds the PIN; its `Debug` shows the label only.
pub(super) struct TokenLogin {
    pub(super) token_label: String,
    pub(super) pin: SecretString,
}

impl fmt::Debug for TokenLogin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenLogin")
            .field("token_label", &self.token_label)
            .finish_non_exhaustive()
    }
}

fn default_sessions() -> usize {
    2
}

fn default_sign_timeout() -> Duration {
    Duration::from_secs(2)
}

fn read_pin_file(path: &Path) -> Result<SecretString, BackendError> {
    let name = path.display();
    let meta = std::fs::metadata(path)
        .map_err(|e| BackendError::PinSource(format!("cannot read PIN file {name}: {e}")))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(BackendError::PinSource(format!(
                "PIN file {name} is accessible by group or others (mode {:o}); chmod 600 it",
                mode & 0o777
            )));
        }
    }
    if !meta.is_file() {
        return Err(BackendError::PinSource(format!("{name} is not a file")));
    }
    let bytes = Zeroizing::new(
        std::fs::read(path)
            .map_err(|e| BackendError::PinSource(format!("cannot read PIN file {name}: {e}")))?,
    );
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| BackendError::PinSource(format!("PIN file {name} is not UTF-8")))?;
    pin_from_text(text, &format!("PIN file {name}"))
}

/// The first line of `text`, without its line ending, as the PIN.
fn pin_from_text(text: &str, source: &str) -> Result<SecretString, BackendError> {
    let line = text.split(['\n', '\r']).next().unwrap_or_default();
    if line.is_empty() {
        return Err(BackendError::PinSource(format!("{source} is empty")));
    }
    Ok(SecretString::from(line.to_owned()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::backend::parse_device_duration as parse_duration;
    use secrecy::ExposeSecret;
    use std::io::Write;

    #[test]
    fn parses_signer_toml_section() {
        let config: Pkcs11Config = toml::from_str(
            r#"
            module = "/usr/lib/softhsm/libsofthsm2.so"
            token_label = "castellan"
            pin_env = "TOKEN_PIN"
            sessions = 3
            sign_timeout = "250ms"
            "#,
        )
        .unwrap();
        assert_eq!(config.sessions, 3);
        assert_eq!(config.sign_timeout, Duration::from_millis(250));
        assert_eq!(
            config.pin_source().unwrap(),
            PinSource::Env("TOKEN_PIN".into())
        );
        config.validate().unwrap();
        let debug = format!("{config:?}");
        assert!(debug.ends_with(", .. }"), "{debug}");
    }

    #[test]
    fn rejects_unknown_fields_and_bad_values() {
        let unknown = toml::from_str::<Pkcs11Config>(
            "module = \"m\"\ntoken_label = \"t\"\npin_env = \"P\"\nslot = 0\n",
        );
        assert!(unknown.is_err());
        let inline_pin =
            toml::from_str::<Pkcs11Config>("module = \"m\"\ntoken_label = \"t\"\npin = \"1234\"\n");
        assert!(inline_pin.is_err(), "an inline PIN must not be accepted");
        let bad_unit = toml::from_str::<Pkcs11Config>(
            "module = \"m\"\ntoken_label = \"t\"\npin_env = \"P\"\nsign_timeout = \"2h\"\n",
        );
        assert!(bad_unit.is_err());

        let mut both = Pkcs11Config::new("m", "t", PinSource::Env("P".into()));
        both.pin_file = Some("f".into());
        assert!(matches!(both.validate(), Err(BackendError::PinSource(_))));
        let mut zero = Pkcs11Config::new("m", "t", PinSource::Env("P".into()));
        zero.sessions = 0;
        assert!(zero.validate().is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("15ms"), Ok(Duration::from_millis(15)));
        assert!(parse_duration("2").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn pin_file_is_read_and_permissions_checked() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pin");
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(b"123456\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let pin = PinSource::File(path.clone()).read().unwrap();
        assert_eq!(pin.expose_secret(), "123456");

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = PinSource::File(path.clone()).read().unwrap_err();
        assert!(matches!(err, BackendError::PinSource(_)));
        assert!(!err.to_string().contains("123456"));

        std::fs::write(&path, b"\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(PinSource::File(path).read().is_err());
        assert!(PinSource::File(dir.path().join("missing")).read().is_err());
    }

    #[test]
    fn login_debug_hides_the_pin() {
        let login = TokenLogin {
            token_label: "t".into(),
            pin: SecretString::from("987654".to_owned()),
        };
        let debug = format!("{login:?}");
        assert!(!debug.contains("987654"));
        assert!(debug.ends_with(".. }"));
    }
}
