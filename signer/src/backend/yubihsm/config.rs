//! Configuration of the YubiHSM 2 backend.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::backend::BackendError;
pub(in crate::backend) use crate::backend::device_duration as duration;
use crate::backend::pkcs11::PinSource;

/// Configuration of a [`super::YubiHsmBackend`], as embedded in `signer.toml`:
///
/// ```toml
/// [backend]
/// type = "yubihsm"
/// auth_key_id = 2
/// password_file = "/etc/castellan/yubihsm.password"   # or: password_env = "CASTELLAN_YUBIHSM_PASSWORD"
/// domains = [1]
/// sign_timeout = "2s"
/// [backend.connector]
/// type = "http"              # yubihsm-connector; or: type = "usb" (+ optional serial = "0012345678")
/// addr = "127.0.0.1"
/// port = 12345
/// ```
///
/// # Security
/// The configuration names where the auth key's password is, never the password itself. The
/// password is read at [`super::YubiHsmBackend::open`] into a zeroizing secret, from a file that
/// must not be readable by group or others, or from the environment.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct YubiHsmConfig {
    /// How to reach the device.
    pub connector: YubiHsmConnector,
    /// Object id of the authentication key the session is opened with.
    pub auth_key_id: u16,
    /// File holding the auth key's password (one line, mode 0600 or stricter).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Environment variable holding the auth key's password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// Domains new keys are generated in (1 to 16); the auth key must have access to them.
    #[serde(default = "default_domains")]
    pub domains: Vec<u8>,
    /// Deadline of one signing request, queueing included.
    #[serde(default = "default_sign_timeout", deserialize_with = "duration")]
    pub sign_timeout: Duration,
}

/// How the backend reaches the YubiHSM 2: a tagged enum (`type = "http"` or `type = "usb"`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum YubiHsmConnector {
    /// Through Yubico's `yubihsm-connector` HTTP service.
    Http {
        /// Host the connector listens on.
        #[serde(default = "default_http_addr")]
        addr: String,
        /// Its port.
        #[serde(default = "default_http_port")]
        port: u16,
        /// Timeout of one HTTP exchange.
        #[serde(default = "default_io_timeout", deserialize_with = "duration")]
        timeout: Duration,
    },
    /// Directly over USB (the process needs access to the device node).
    Usb {
        /// The device's serial number (10 digits); the first device found when absent.
        #[serde(default)]
        serial: Option<String>,
        /// Timeout of one USB exchange.
        #[serde(default = "default_io_timeout", deserialize_with = "duration")]
        timeout: Duration,
    },
}

impl fmt::Display for YubiHsmConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Http { addr, port, .. } => write!(f, "http://{addr}:{port}"),
            Self::Usb {
                serial: Some(serial),
                ..
            } => write!(f, "usb serial {serial}"),
            Self::Usb { serial: None, .. } => write!(f, "usb"),
        }
    }
}

impl YubiHsmConfig {
    /// A configuration with the default domain (1) and timeout.
    pub fn new(connector: YubiHsmConnector, auth_key_id: u16, password: PinSource) -> Self {
        let (password_file, password_env) = match password {
            PinSource::File(path) => (Some(path), None),
            PinSource::Env(var) => (None, Some(var)),
        };
        Self {
            connector,
            auth_key_id,
            password_file,
            password_env,
            domains: default_domains(),
            sign_timeout: default_sign_timeout(),
        }
    }

    /// Where the password comes from; an error unless exactly one of `password_file` and
    /// `password_env` is set.
    pub fn password_source(&self) -> Result<PinSource, BackendError> {
        match (&self.password_file, &self.password_env) {
            (Some(path), None) => Ok(PinSource::File(path.clone())),
            (None, Some(var)) => Ok(PinSource::Env(var.clone())),
            _ => Err(BackendError::PinSource(
                "exactly one of password_file and password_env must be set".into(),
            )),
        }
    }

    /// Checks what serde cannot: the password source, the domains, the timeouts and the serial.
    pub fn validate(&self) -> Result<(), BackendError> {
        self.password_source()?;
        if self.auth_key_id == 0 {
            return Err(invalid("auth_key_id must not be 0"));
        }
        if self.domains.is_empty() || self.domains.iter().any(|d| !(1..=16).contains(d)) {
            return Err(invalid(
                "domains must be a non-empty list of numbers from 1 to 16",
            ));
        }
        if self.sign_timeout.is_zero() {
            return Err(invalid("sign_timeout must not be zero"));
        }
        match &self.connector {
            YubiHsmConnector::Http { addr, timeout, .. } => {
                if addr.is_empty() || timeout.is_zero() {
                    return Err(invalid("connector: addr must be set and timeout non-zero"));
                }
            }
            YubiHsmConnector::Usb { serial, timeout } => {
                if timeout.is_zero() {
                    return Err(invalid("connector: timeout must not be zero"));
                }
                if let Some(serial) = serial {
                    serial
                        .parse::<::yubihsm::device::SerialNumber>()
                        .map_err(|_| invalid("connector: serial must be 10 digits"))?;
                }
            }
        }
        Ok(())
    }
}

impl fmt::Debug for YubiHsmConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("YubiHsmConfig")
            .field("connector", &self.connector)
            .field("auth_key_id", &self.auth_key_id)
            .field("password_file", &self.password_file)
            .field("password_env", &self.password_env)
            .field("domains", &self.domains)
            .field("sign_timeout", &self.sign_timeout)
            .finish_non_exhaustive()
    }
}

fn invalid(reason: &str) -> BackendError {
    BackendError::Unavailable(format!("invalid YubiHSM configuration: {reason}"))
}

fn default_domains() -> Vec<u8> {
    vec![1]
}

fn default_sign_timeout() -> Duration {
    Duration::from_secs(2)
}

fn default_io_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_http_addr() -> String {
    "127.0.0.1".into()
}

fn default_http_port() -> u16 {
    12345
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn parses_http_and_usb_sections() {
        let c: YubiHsmConfig = toml::from_str(
            r#"
            auth_key_id = 2
            password_file = "/etc/castellan/yubihsm.password"
            sign_timeout = "500ms"
            [connector]
            type = "http"
            port = 12346
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.sign_timeout, Duration::from_millis(500));
        assert_eq!(c.connector.to_string(), "http://127.0.0.1:12346");
        let u: YubiHsmConfig = toml::from_str(
            "auth_key_id = 1\npassword_env = \"P\"\n[connector]\ntype = \"usb\"\nserial = \"0123456789\"\n",
        )
        .unwrap();
        u.validate().unwrap();
        assert!(format!("{u:?}").ends_with(".. }"));
    }

    #[test]
    fn refuses_inline_passwords_and_bad_values() {
        let inline = toml::from_str::<YubiHsmConfig>(
            "auth_key_id = 1\npassword = \"password\"\n[connector]\ntype = \"usb\"\n",
        );
        assert!(inline.is_err(), "an inline password must not be accepted");
        let c: YubiHsmConfig =
            toml::from_str("auth_key_id = 1\n[connector]\ntype = \"usb\"\n").unwrap();
        assert!(matches!(c.validate(), Err(BackendError::PinSource(_))));
        let mut d = YubiHsmConfig::new(
            YubiHsmConnector::Usb {
                serial: Some("12".into()),
                timeout: Duration::from_secs(1),
            },
            1,
            PinSource::Env("P".into()),
        );
        assert!(d.validate().is_err());
        d.connector = YubiHsmConnector::Usb {
            serial: None,
            timeout: Duration::from_secs(1),
        };
        d.validate().unwrap();
        d.domains = vec![17];
        assert!(d.validate().is_err());
    }
}
