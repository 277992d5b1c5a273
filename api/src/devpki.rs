//! A development certificate authority: the CA, server and client certificates and CRLs that
//! `keyctl dev init` writes for a development appliance and that the tests use.
//!
//! # Security
//! These are TLS identities, not Ethereum keys (those live only in HSMs). The CA and leaf private
//! keys are generated in memory with `ring` and written only to files of mode 0600; production
//! deployments bring certificates from their own PKI.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber,
};
use secrecy::{ExposeSecret, SecretString};
use time::OffsetDateTime;

/// Errors of the development PKI.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(String),
    /// Writing a file failed.
    #[error("cannot write {path}: {reason}")]
    Write {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
}

/// How a leaf certificate names its holder (what [`crate::tls::identity_of`] will read back).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeafName {
    /// A SAN URI, e.g. `spiffe://castellan/strategy/alpha`.
    Uri(String),
    /// A SAN DNS name (servers: also what clients connect to).
    Dns(String),
    /// Only a subject common name, no SAN.
    Cn(String),
}

/// What to issue.
#[derive(Clone, Debug)]
pub struct LeafSpec {
    /// The holder's name.
    pub name: LeafName,
    /// Extra SAN DNS names and IP addresses (servers: `localhost`, `127.0.0.1`).
    pub extra_dns: Vec<String>,
    /// A server certificate (server-auth usage) rather than a client one (client-auth usage).
    pub server: bool,
    /// Valid from this many seconds relative to now (negative: in the past).
    pub not_before_offset: i64,
    /// Valid until this many seconds relative to now (negative: already expired).
    pub not_after_offset: i64,
}

impl LeafSpec {
    /// A client certificate named by a SAN URI, valid from an hour ago for a year.
    pub fn client_uri(uri: impl Into<String>) -> Self {
        Self {
            name: LeafName::Uri(uri.into()),
            extra_dns: vec![],
            server: false,
            not_before_offset: -3600,
            not_after_offset: 365 * 86400,
        }
    }

    /// A server certificate for `localhost` and `127.0.0.1`, valid for a year.
    pub fn server_localhost() -> Self {
        Self {
            name: LeafName::Dns("localhost".into()),
            extra_dns: vec!["127.0.0.1".into()],
            server: true,
            not_before_offset: -3600,
            not_after_offset: 365 * 86400,
        }
    }
}

/// An issued certificate with its private key (PEM).
pub struct Issued {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PEM. Secret.
    pub key_pem: SecretString,
    /// The certificate's serial number (for revocation).
    pub serial: u64,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

impl Issued {
    /// Writes `<dir>/<stem>.pem` (0644) and `<dir>/<stem>.key` (0600).
    pub fn write(&self, dir: &Path, stem: &str) -> Result<(), PkiError> {
        write_file(
            &dir.join(format!("{stem}.pem")),
            self.cert_pem.as_bytes(),
            0o644,
        )?;
        write_file(
            &dir.join(format!("{stem}.key")),
            self.key_pem.expose_secret().as_bytes(),
            0o600,
        )
    }
}

/// A development CA.
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key_pem: SecretString,
    next_serial: u64,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa")
            .field("next_serial", &self.next_serial)
            .finish_non_exhaustive()
    }
}

impl DevCa {
    /// A new self-signed CA (ECDSA P-256) valid for ten years.
    pub fn new(common_name: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate().map_err(gen_err)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::from_secs(3600);
        params.not_after = now + Duration::from_secs(10 * 365 * 86400);
        params.serial_number = Some(SerialNumber::from(1u64));
        let cert = params.self_signed(&key).map_err(gen_err)?;
        let key_pem = SecretString::from(key.serialize_pem());
        Ok(Self {
            issuer: Issuer::new(params, key),
            cert_pem: cert.pem(),
            key_pem,
            next_serial: 2,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Writes `<dir>/<stem>.pem` (0644) and `<dir>/<stem>.key` (0600).
    pub fn write(&self, dir: &Path, stem: &str) -> Result<(), PkiError> {
        write_file(
            &dir.join(format!("{stem}.pem")),
            self.cert_pem.as_bytes(),
            0o644,
        )?;
        write_file(
            &dir.join(format!("{stem}.key")),
            self.key_pem.expose_secret().as_bytes(),
            0o600,
        )
    }

    /// Issues a leaf certificate.
    pub fn issue(&mut self, spec: &LeafSpec) -> Result<Issued, PkiError> {
        let key = KeyPair::generate().map_err(gen_err)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
        let mut dn = DistinguishedName::new();
        let cn = match &spec.name {
            LeafName::Uri(u) => {
                params
                    .subject_alt_names
                    .push(SanType::URI(u.as_str().try_into().map_err(gen_err)?));
                u.clone()
            }
            LeafName::Dns(d) => {
                params
                    .subject_alt_names
                    .push(SanType::DnsName(d.as_str().try_into().map_err(gen_err)?));
                d.clone()
            }
            LeafName::Cn(c) => c.clone(),
        };
        dn.push(DnType::CommonName, cn);
        params.distinguished_name = dn;
        for extra in &spec.extra_dns {
            match extra.parse::<std::net::IpAddr>() {
                Ok(ip) => params.subject_alt_names.push(SanType::IpAddress(ip)),
                Err(_) => params.subject_alt_names.push(SanType::DnsName(
                    extra.as_str().try_into().map_err(gen_err)?,
                )),
            }
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![if spec.server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let now = OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::seconds(spec.not_before_offset);
        params.not_after = now + time::Duration::seconds(spec.not_after_offset);
        let serial = self.next_serial;
        self.next_serial += 1;
        params.serial_number = Some(SerialNumber::from(serial));
        let cert = params.signed_by(&key, &self.issuer).map_err(gen_err)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: SecretString::from(key.serialize_pem()),
            serial,
        })
    }

    /// A CRL revoking the given serial numbers, whose `nextUpdate` is `next_update_in` seconds
    /// from now (negative: a stale CRL, for tests of CRL expiry).
    pub fn crl_pem(
        &self,
        crl_number: u64,
        revoked: &[u64],
        next_update_in: i64,
    ) -> Result<String, PkiError> {
        let now = OffsetDateTime::now_utc();
        let next_update = now + time::Duration::seconds(next_update_in);
        let params = CertificateRevocationListParams {
            this_update: next_update.min(now) - Duration::from_secs(3600),
            next_update,
            crl_number: SerialNumber::from(crl_number),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from(*s),
                    revocation_time: now - Duration::from_secs(60),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        params
            .signed_by(&self.issuer)
            .and_then(|crl| crl.pem())
            .map_err(gen_err)
    }
}

/// The serial number of a certificate in PEM (the first one in `pem`), e.g. to revoke a
/// certificate issued earlier by a [`DevCa`] whose [`Issued`] value is gone.
pub fn serial_of_pem(pem: &str) -> Result<u64, PkiError> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(gen_err)?;
    let cert = block.parse_x509().map_err(gen_err)?;
    u64::try_from(cert.tbs_certificate.serial.clone())
        .map_err(|_| gen_err("the serial number does not fit in 64 bits"))
}

/// Writes a file durably with the given mode: temp file, `sync_all`, rename, directory fsync.
/// Secret files are created with their mode from the start (never world-readable in between).
pub fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let err = |e: std::io::Error| PkiError::Write {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let mut opts = OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    let mut f = opts.open(&tmp).map_err(err)?;
    #[cfg(unix)]
    {
        // The mode of an existing temp file is not changed by `open`; set it explicitly.
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(err)?;
    }
    f.write_all(contents).map_err(err)?;
    f.sync_all().map_err(err)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(err)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(err)
}

fn gen_err(e: impl std::fmt::Display) -> PkiError {
    PkiError::Generate(e.to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn serial_of_pem_reads_back_what_was_issued() {
        let mut ca = DevCa::new("serial test").unwrap();
        for _ in 0..3 {
            let leaf = ca.issue(&LeafSpec::client_uri("spiffe://t/x")).unwrap();
            assert_eq!(serial_of_pem(&leaf.cert_pem).unwrap(), leaf.serial);
        }
        assert_eq!(serial_of_pem(ca.cert_pem()).unwrap(), 1);
        assert!(serial_of_pem("not a certificate").is_err());
    }
}
