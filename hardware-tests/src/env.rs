//! Which real devices the environment names, parsed once.

use std::path::PathBuf;
use std::time::Duration;

use alloy::primitives::Address;
use castellan_signer::backend::pkcs11::{PinSource, Pkcs11Config};
use castellan_signer::backend::yubihsm::{YubiHsmConfig, YubiHsmConnector};

/// `http://HOST:PORT` of a yubihsm-connector, `usb`, or `usb:SERIAL`.
pub const YUBIHSM_CONNECTOR: &str = "CASTELLAN_YUBIHSM_CONNECTOR";
/// Object id of the auth key (default 1, the factory auth key).
pub const YUBIHSM_AUTH_KEY: &str = "CASTELLAN_YUBIHSM_AUTH_KEY";
/// File (mode 0600) holding the auth key's password.
pub const YUBIHSM_PASSWORD_FILE: &str = "CASTELLAN_YUBIHSM_PASSWORD_FILE";
/// `1` when a Ledger with the Ethereum app open is plugged in.
pub const LEDGER: &str = "CASTELLAN_LEDGER";
/// The derivation path to use (default `m/44'/60'/0'/0/0`).
pub const LEDGER_PATH: &str = "CASTELLAN_LEDGER_PATH";
/// Optional: the address the Ledger must show for that path.
pub const LEDGER_ADDRESS: &str = "CASTELLAN_LEDGER_ADDRESS";
/// Path of a PKCS#11 module (e.g. `/usr/lib/x86_64-linux-gnu/pkcs11/yubihsm_pkcs11.so`).
pub const PKCS11_MODULE: &str = "CASTELLAN_HW_PKCS11_MODULE";
/// Label of the token to use.
pub const PKCS11_TOKEN: &str = "CASTELLAN_HW_PKCS11_TOKEN";
/// File (mode 0600) holding the token's user PIN.
pub const PKCS11_PIN_FILE: &str = "CASTELLAN_HW_PKCS11_PIN_FILE";
/// `1` to run the cases that need a person at the device (unplug, confirm, reject).
pub const INTERACTIVE: &str = "CASTELLAN_HW_INTERACTIVE";
/// `all` or a comma-separated list of `yubihsm`, `ledger`, `pkcs11`: skipping one of these
/// devices fails the run.
pub const REQUIRE: &str = "CASTELLAN_HW_REQUIRE";

/// A kind of device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// A YubiHSM 2 over its native protocol.
    YubiHsm,
    /// A Ledger with the Ethereum app.
    Ledger,
    /// Any PKCS#11 token.
    Pkcs11,
}

impl Device {
    /// The name used in [`REQUIRE`].
    pub fn name(self) -> &'static str {
        match self {
            Self::YubiHsm => "yubihsm",
            Self::Ledger => "ledger",
            Self::Pkcs11 => "pkcs11",
        }
    }

    /// What a skip report tells the reader to set.
    pub fn how_to_enable(self) -> &'static str {
        match self {
            Self::YubiHsm => {
                "set CASTELLAN_YUBIHSM_CONNECTOR (and CASTELLAN_YUBIHSM_PASSWORD_FILE, \
                 CASTELLAN_YUBIHSM_AUTH_KEY) to run against a real YubiHSM 2"
            }
            Self::Ledger => {
                "set CASTELLAN_LEDGER=1 (and CASTELLAN_LEDGER_PATH) to run against a real Ledger"
            }
            Self::Pkcs11 => {
                "set CASTELLAN_HW_PKCS11_MODULE, CASTELLAN_HW_PKCS11_TOKEN and \
                 CASTELLAN_HW_PKCS11_PIN_FILE to run against a real PKCS#11 token"
            }
        }
    }
}

/// A named Ledger.
#[derive(Clone, Debug)]
pub struct LedgerTarget {
    /// The derivation path to sign with.
    pub path: String,
    /// The address it must have, when given.
    pub expected_address: Option<Address>,
}

/// The devices the environment names; `Err` says why a device is not usable (for the skip
/// report), including a malformed variable.
#[derive(Debug)]
pub struct Targets {
    /// The YubiHSM 2.
    pub yubihsm: Result<YubiHsmConfig, String>,
    /// The Ledger.
    pub ledger: Result<LedgerTarget, String>,
    /// The PKCS#11 token.
    pub pkcs11: Result<Pkcs11Config, String>,
    /// Whether a person is at the devices.
    pub interactive: bool,
    /// Devices whose skip fails the run.
    pub required: Vec<Device>,
}

impl Targets {
    /// From the process environment.
    pub fn from_env() -> Self {
        Self::from_vars(&|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
    }

    /// From a lookup function (tests pass a map).
    pub fn from_vars(get: &dyn Fn(&str) -> Option<String>) -> Self {
        let required = match get(REQUIRE).as_deref() {
            None => Vec::new(),
            Some("all") => vec![Device::YubiHsm, Device::Ledger, Device::Pkcs11],
            Some(list) => list
                .split(',')
                .filter_map(|d| match d.trim() {
                    "yubihsm" => Some(Device::YubiHsm),
                    "ledger" => Some(Device::Ledger),
                    "pkcs11" => Some(Device::Pkcs11),
                    _ => None,
                })
                .collect(),
        };
        Self {
            yubihsm: yubihsm(get),
            ledger: ledger(get),
            pkcs11: pkcs11(get),
            interactive: get(INTERACTIVE).as_deref() == Some("1"),
            required,
        }
    }

    /// Whether `device` is named (its configuration parsed).
    pub fn has(&self, device: Device) -> Result<(), String> {
        match device {
            Device::YubiHsm => self.yubihsm.as_ref().map(|_| ()).map_err(Clone::clone),
            Device::Ledger => self.ledger.as_ref().map(|_| ()).map_err(Clone::clone),
            Device::Pkcs11 => self.pkcs11.as_ref().map(|_| ()).map_err(Clone::clone),
        }
    }
}

fn yubihsm(get: &dyn Fn(&str) -> Option<String>) -> Result<YubiHsmConfig, String> {
    let connector = get(YUBIHSM_CONNECTOR).ok_or_else(|| Device::YubiHsm.how_to_enable())?;
    let timeout = Duration::from_secs(5);
    let connector = if let Some(rest) = connector.strip_prefix("http://") {
        let (addr, port) = rest
            .trim_end_matches('/')
            .rsplit_once(':')
            .ok_or_else(|| format!("{YUBIHSM_CONNECTOR}={connector}: expected http://HOST:PORT"))?;
        let port = port
            .parse()
            .map_err(|_| format!("{YUBIHSM_CONNECTOR}={connector}: bad port"))?;
        YubiHsmConnector::Http {
            addr: addr.to_owned(),
            port,
            timeout,
        }
    } else if connector == "usb" {
        YubiHsmConnector::Usb {
            serial: None,
            timeout,
        }
    } else if let Some(serial) = connector.strip_prefix("usb:") {
        YubiHsmConnector::Usb {
            serial: Some(serial.to_owned()),
            timeout,
        }
    } else {
        return Err(format!(
            "{YUBIHSM_CONNECTOR}={connector}: expected http://HOST:PORT, usb or usb:SERIAL"
        ));
    };
    let auth_key = match get(YUBIHSM_AUTH_KEY) {
        Some(id) => id
            .parse()
            .map_err(|_| format!("{YUBIHSM_AUTH_KEY}={id}: not an object id"))?,
        None => 1,
    };
    let password = get(YUBIHSM_PASSWORD_FILE)
        .ok_or_else(|| format!("{YUBIHSM_CONNECTOR} is set but {YUBIHSM_PASSWORD_FILE} is not"))?;
    Ok(YubiHsmConfig::new(
        connector,
        auth_key,
        PinSource::File(PathBuf::from(password)),
    ))
}

fn ledger(get: &dyn Fn(&str) -> Option<String>) -> Result<LedgerTarget, String> {
    if get(LEDGER).as_deref() != Some("1") {
        return Err(Device::Ledger.how_to_enable().to_owned());
    }
    let expected_address = match get(LEDGER_ADDRESS) {
        Some(a) => Some(
            a.parse()
                .map_err(|_| format!("{LEDGER_ADDRESS}={a}: not an address"))?,
        ),
        None => None,
    };
    Ok(LedgerTarget {
        path: get(LEDGER_PATH).unwrap_or_else(|| "m/44'/60'/0'/0/0".to_owned()),
        expected_address,
    })
}

fn pkcs11(get: &dyn Fn(&str) -> Option<String>) -> Result<Pkcs11Config, String> {
    let module = get(PKCS11_MODULE).ok_or_else(|| Device::Pkcs11.how_to_enable())?;
    let token = get(PKCS11_TOKEN)
        .ok_or_else(|| format!("{PKCS11_MODULE} is set but {PKCS11_TOKEN} is not"))?;
    let pin = get(PKCS11_PIN_FILE)
        .ok_or_else(|| format!("{PKCS11_MODULE} is set but {PKCS11_PIN_FILE} is not"))?;
    Ok(Pkcs11Config::new(
        module,
        token,
        PinSource::File(PathBuf::from(pin)),
    ))
}
