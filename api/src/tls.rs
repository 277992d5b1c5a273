//! Mutual TLS for every Castellan listener and client: TLS 1.3 only, client certificates that
//! must chain to a configured CA bundle and not be revoked, and the caller's identity taken from
//! the certificate.
//!
//! # Security
//! - Only TLS 1.3 is offered, with rustls' `ring` provider; a client that offers only TLS 1.2 fails
//!   the handshake.
//! - A server built from [`ServerTlsConfig`] requires a client certificate that chains to
//!   `client_ca`; when a CRL file is configured, a revoked end-entity certificate is refused, and
//!   so is a certificate whose revocation status the CRLs cannot establish.
//! - The identity is the first SAN URI, else the first SAN DNS name, else the subject CN. Roles are
//!   not decided here: the server maps identities to roles, and an unknown identity is refused
//!   after the handshake.
//! - [`ReloadableServerConfig`] swaps in a new CA bundle and CRL without a restart; a reload that
//!   fails keeps the previous configuration (a bad file never opens the door).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use serde::{Deserialize, Serialize};

/// TLS settings of a server (the signer, the submitter).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsConfig {
    /// PEM certificate chain of the server, leaf first.
    pub cert: PathBuf,
    /// PEM private key of the server (a file of mode 0600).
    pub key: PathBuf,
    /// PEM bundle of the CAs that client certificates must chain to.
    pub client_ca: PathBuf,
    /// PEM or DER certificate revocation lists of those CAs, if any.
    #[serde(default)]
    pub crl: Vec<PathBuf>,
    /// Refuse clients when a CRL is past its `nextUpdate` (fail closed on a stale CRL).
    #[serde(default = "default_true")]
    pub crl_enforce_next_update: bool,
}

/// TLS settings of a client (keyctl, the submitter calling the signer, strategy hosts).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTlsConfig {
    /// PEM bundle of the CAs the server certificate must chain to.
    pub server_ca: PathBuf,
    /// PEM certificate chain of this client, leaf first.
    pub cert: PathBuf,
    /// PEM private key of this client (a file of mode 0600).
    pub key: PathBuf,
}

/// Who is calling: the identity taken from a verified client certificate.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Identity(String);

impl Identity {
    /// Wraps an identity string as written in configuration (a SAN URI, DNS name or CN).
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The identity as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({:?})", self.0)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Errors building TLS configurations or reading certificates.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM/DER file could not be read or parsed.
    #[error("cannot read {what} from {path}: {reason}")]
    File {
        /// What the file should hold ("server certificate", "client CA bundle", …).
        what: &'static str,
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// rustls refused the configuration (for example a key that does not match the certificate).
    #[error("TLS configuration refused: {0}")]
    Config(String),
    /// The peer presented no certificate or one whose identity cannot be read.
    #[error("no usable identity in the client certificate: {0}")]
    Identity(String),
}

/// The `ring` crypto provider, the only one Castellan builds with.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl ServerTlsConfig {
    /// Reads the files and builds a rustls server configuration (TLS 1.3, client auth required).
    pub fn build(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let chain = read_certs(&self.cert, "server certificate")?;
        let key = read_key(&self.key, "server private key")?;
        let mut roots = RootCertStore::empty();
        for ca in read_certs(&self.client_ca, "client CA bundle")? {
            roots.add(ca).map_err(|e| TlsError::File {
                what: "client CA bundle",
                path: self.client_ca.display().to_string(),
                reason: e.to_string(),
            })?;
        }
        let mut crls = Vec::new();
        for path in &self.crl {
            crls.extend(read_crls(path)?);
        }
        let mut verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
        if !crls.is_empty() {
            verifier = verifier.with_crls(crls).only_check_end_entity_revocation();
            if self.crl_enforce_next_update {
                verifier = verifier.enforce_revocation_expiration();
            }
        }
        let verifier = verifier
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        Ok(Arc::new(config))
    }

    /// The files whose change should trigger a reload.
    fn watched_files(&self) -> Vec<PathBuf> {
        let mut v = vec![self.cert.clone(), self.key.clone(), self.client_ca.clone()];
        v.extend(self.crl.iter().cloned());
        v
    }
}

impl ClientTlsConfig {
    /// Reads the files and builds a rustls client configuration (TLS 1.3, with a client
    /// certificate).
    pub fn build(&self) -> Result<ClientConfig, TlsError> {
        let mut roots = RootCertStore::empty();
        for ca in read_certs(&self.server_ca, "server CA bundle")? {
            roots.add(ca).map_err(|e| TlsError::File {
                what: "server CA bundle",
                path: self.server_ca.display().to_string(),
                reason: e.to_string(),
            })?;
        }
        let chain = read_certs(&self.cert, "client certificate")?;
        let key = read_key(&self.key, "client private key")?;
        ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| TlsError::Config(e.to_string()))
    }
}

/// A server configuration that can be swapped at run time (new CA bundle or CRL) without a
/// restart. Each new connection uses the configuration current at its accept.
pub struct ReloadableServerConfig {
    source: ServerTlsConfig,
    current: RwLock<Arc<ServerConfig>>,
    stamp: RwLock<Vec<Option<FileStamp>>>,
}

/// What identifies a watched file's version: its modification time, length and a hash of its
/// contents. The time alone is not enough: two writes within one tick of the file system's
/// clock (a few milliseconds) leave it unchanged, and a CRL update would go unnoticed.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    hash: u64,
}

impl ReloadableServerConfig {
    /// Builds the initial configuration; fails if it cannot be built.
    pub fn new(source: ServerTlsConfig) -> Result<Self, TlsError> {
        let config = source.build()?;
        let stamp = file_stamps(&source.watched_files());
        Ok(Self {
            source,
            current: RwLock::new(config),
            stamp: RwLock::new(stamp),
        })
    }

    /// The configuration to use for the next connection.
    pub fn current(&self) -> Arc<ServerConfig> {
        // A poisoned lock still holds a valid configuration: no writer leaves it half-written.
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Rebuilds from the files now. On failure the previous configuration stays in force.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = self.source.build()?;
        let stamp = file_stamps(&self.source.watched_files());
        match self.current.write() {
            Ok(mut g) => *g = config,
            Err(p) => *p.into_inner() = config,
        }
        match self.stamp.write() {
            Ok(mut g) => *g = stamp,
            Err(p) => *p.into_inner() = stamp,
        }
        Ok(())
    }

    /// Reloads if any watched file changed (time, length or contents) since the last (re)load.
    /// Returns whether a reload happened.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let now = file_stamps(&self.source.watched_files());
        let changed = match self.stamp.read() {
            Ok(g) => *g != now,
            Err(p) => *p.into_inner() != now,
        };
        if changed {
            self.reload()?;
        }
        Ok(changed)
    }
}

/// The identity of a verified peer certificate: first SAN URI, else first SAN DNS, else CN.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<Identity, TlsError> {
    use x509_parser::extensions::GeneralName;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| TlsError::Identity(e.to_string()))?;
    let mut dns = None;
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(uri) => return Ok(Identity::new(*uri)),
                GeneralName::DNSName(d) if dns.is_none() => dns = Some(*d),
                _ => {}
            }
        }
    }
    if let Some(d) = dns {
        return Ok(Identity::new(d));
    }
    let cn = parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or_else(|| TlsError::Identity("no SAN URI, SAN DNS or CN".into()))?;
    Ok(Identity::new(cn))
}

fn default_true() -> bool {
    true
}

fn file_stamps(paths: &[PathBuf]) -> Vec<Option<FileStamp>> {
    use std::hash::{Hash, Hasher};
    paths
        .iter()
        .map(|p| {
            let meta = std::fs::metadata(p).ok()?;
            let bytes = std::fs::read(p).ok()?;
            let mut h = std::collections::hash_map::DefaultHasher::new();
            bytes.hash(&mut h);
            Some(FileStamp {
                modified: meta.modified().ok(),
                len: meta.len(),
                hash: h.finish(),
            })
        })
        .collect()
}

fn read_certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |reason: String| TlsError::File {
        what,
        path: path.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no PEM certificate in the file".into()));
    }
    Ok(certs)
}

fn read_key(path: &Path, what: &'static str) -> Result<PrivateKeyDer<'static>, TlsError> {
    // The error never includes the file's contents.
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::File {
        what,
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

fn read_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let err = |reason: String| TlsError::File {
        what: "CRL",
        path: path.display().to_string(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    if bytes.starts_with(b"-----BEGIN") {
        let crls = CertificateRevocationListDer::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| err(e.to_string()))?;
        if crls.is_empty() {
            return Err(err("no PEM CRL in the file".into()));
        }
        Ok(crls)
    } else {
        Ok(vec![CertificateRevocationListDer::from(bytes)])
    }
}
