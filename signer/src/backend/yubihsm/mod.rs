//! YubiHSM 2 key backend over the device's native protocol (the `yubihsm` crate), through
//! Yubico's HTTP `yubihsm-connector` or directly over USB.
//!
//! # Design
//! - The `yubihsm` [`Client`] is blocking, so one worker thread owns it and serves requests from
//!   a bounded channel, replying on a oneshot: async callers never block, and when the queue is
//!   full a request fails at once with [`BackendError::Unavailable`]. A YubiHSM 2 executes one
//!   command at a time anyway, so one worker is all the device can use.
//! - The session is authenticated with an auth key id and its password (read from a 0600 file
//!   or the environment into a zeroizing secret). An idle session is pinged every
//!   [`KEEPALIVE`] (the device closes sessions after 30 s of silence).
//! - When the connector, the USB device or the session is lost, [`KeyBackend::health`] turns to
//!   [`Health::Recovering`], new requests fail fast, and the worker reconnects with exponential
//!   backoff (50 ms doubling to 2 s); the request that met the loss is retried once on the new
//!   session. A refused authentication stops the retries and is reported as
//!   [`BackendError::AuthFailed`].
//! - Signing: `Sign ECDSA` over the 32-byte digest returns DER, which
//!   [`super::ecdsa::eth_signature_from_der`] turns into a verified low-s signature with its
//!   y-parity.
//! - Keys are generated on the device as `EcK256` asymmetric keys with the `sign-ecdsa`
//!   capability only: **not** `exportable-under-wrap`. A key that can be backed up under a wrap
//!   key is made only by the loudly named [`YubiHsmBackend::generate_with_wrapped_backup`].
//! - [`YubiHsmBackend::audit_log`] reads the device's own audit log (for `keyctl`);
//!   [`YubiHsmBackend::ack_audit_log`] acknowledges it up to an entry that was read.

mod config;

use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ::yubihsm::client::ErrorKind as ClientErrorKind;
use ::yubihsm::object::{self, Filter, Label};
use ::yubihsm::{Capability, Client, Connector, Credentials, Domain, asymmetric};
use alloy::primitives::{Address, B256};
use k256::ecdsa::VerifyingKey;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::oneshot;

pub(in crate::backend) use config::duration as config_duration;
pub use config::{YubiHsmConfig, YubiHsmConnector};

use super::{BackendError, EthSignature, Health, KeyBackend, KeyInfo, KeyRef, SignRequest, ecdsa};

/// How often an idle session is pinged (the device closes it after 30 s without commands).
pub const KEEPALIVE: Duration = Duration::from_secs(10);

/// Queued requests before new ones are refused with `Unavailable`.
const QUEUE: usize = 64;

/// Deadline of generate, destroy, look-ups and audit-log reads.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Reconnection backoff.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Longest object label the device stores.
const MAX_LABEL: usize = 40;

/// One entry of the YubiHSM 2's own audit log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceLogEntry {
    /// The entry's number (wraps at 65535).
    pub item: u16,
    /// The command, for example `SignEcdsa`.
    pub command: String,
    /// The command's length in bytes.
    pub length: u16,
    /// The auth key of the session that ran it.
    pub session_key: u16,
    /// The object it acted on.
    pub target_key: u16,
    /// A second object it acted on (for example the wrap key of an export).
    pub second_key: u16,
    /// The result code, for example `Success(SignEcdsa)` or `DeviceObjectNotFound`.
    pub result: String,
    /// The device's tick counter.
    pub tick: u32,
    /// The device's 16-byte truncated SHA-256 chaining digest, hex.
    pub digest: String,
}

/// The device's audit log as read by [`YubiHsmBackend::audit_log`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceLog {
    /// Boot events the device could not log (its log was full and audit was enforced).
    pub unlogged_boot_events: u16,
    /// Authentication events the device could not log.
    pub unlogged_auth_events: u16,
    /// The entries, oldest first.
    pub entries: Vec<DeviceLogEntry>,
}

/// A YubiHSM 2 used as a [`KeyBackend`].
///
/// # Security
/// Keys are generated on the device, sign-only and not exportable under wrap (unless created by
/// [`YubiHsmBackend::generate_with_wrapped_backup`]); every signature is verified against the
/// expected public key before it is returned. The auth key's password lives in a zeroizing
/// secret (and, derived, inside the `yubihsm` client) and appears in no error, log line or
/// `Debug` output.
pub struct YubiHsmBackend {
    sender: Option<SyncSender<Job>>,
    health: Arc<Mutex<Health>>,
    thread: Option<JoinHandle<()>>,
    sign_timeout: Duration,
    device: String,
}

impl std::fmt::Debug for YubiHsmBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("YubiHsmBackend")
            .field("device", &self.device)
            .field("sign_timeout", &self.sign_timeout)
            .finish_non_exhaustive()
    }
}

impl YubiHsmBackend {
    /// Reads the password, connects, authenticates and pings the device. This is the backend's
    /// self-check: when it returns, the backend is ready to sign.
    ///
    /// Errors: [`BackendError::PinSource`] (password file missing, readable by others, empty),
    /// [`BackendError::AuthFailed`] (wrong auth key id or password),
    /// [`BackendError::Unavailable`] (no connector or device).
    pub fn open(config: &YubiHsmConfig) -> Result<Self, BackendError> {
        config.validate()?;
        let password = config.password_source()?.read()?;
        let connector = match &config.connector {
            YubiHsmConnector::Http {
                addr,
                port,
                timeout,
            } => Connector::http(&::yubihsm::HttpConfig {
                addr: addr.clone(),
                port: *port,
                timeout_ms: millis(*timeout),
            }),
            YubiHsmConnector::Usb { serial, timeout } => {
                let serial = match serial {
                    Some(s) => Some(s.parse().map_err(|_| {
                        BackendError::Unavailable(format!("invalid YubiHSM serial {s:?}"))
                    })?),
                    None => None,
                };
                Connector::usb(&::yubihsm::UsbConfig {
                    serial,
                    timeout_ms: millis(*timeout),
                })
            }
        };
        Self::open_with_connector(
            connector,
            &config.connector.to_string(),
            config.auth_key_id,
            &password,
            &config.domains,
            config.sign_timeout,
        )
    }

    /// Like [`YubiHsmBackend::open`] with a ready-made connector (for tests: the `yubihsm`
    /// crate's MockHsm, `Connector::mockhsm()`, available in debug builds only).
    ///
    /// `device` names the device in errors and logs; `domains` are the domains (1 to 16) new
    /// keys are generated in.
    pub fn open_with_connector(
        connector: Connector,
        device: &str,
        auth_key_id: u16,
        password: &SecretString,
        domains: &[u8],
        sign_timeout: Duration,
    ) -> Result<Self, BackendError> {
        let mut domain = Domain::empty();
        for d in domains {
            domain |= Domain::at(usize::from(*d)).map_err(|e| {
                BackendError::Unavailable(format!("invalid YubiHSM domain {d}: {e}"))
            })?;
        }
        if domain.is_empty() {
            return Err(BackendError::Unavailable(
                "at least one YubiHSM domain is needed".into(),
            ));
        }
        let device = format!("YubiHSM 2 at {device}, auth key {auth_key_id}");
        let credentials =
            Credentials::from_password(auth_key_id, password.expose_secret().as_bytes());
        let client = connect(&connector, &credentials, &device)?;
        let health = Arc::new(Mutex::new(Health::Ready));
        let (sender, receiver) = sync_channel::<Job>(QUEUE);
        let worker = Worker {
            connector,
            credentials,
            client: Some(client),
            device: device.clone(),
            domain,
            health: Arc::clone(&health),
            backoff: BACKOFF_MIN,
            next_attempt: Instant::now(),
        };
        let thread = std::thread::Builder::new()
            .name("yubihsm-worker".into())
            .spawn(move || {
                // Wakes when the device answers: first on the CPU (see `crate::sched`).
                crate::sched::device_thread();
                worker.run(&receiver);
            })
            .map_err(|e| BackendError::Unavailable(format!("cannot start a thread: {e}")))?;
        Ok(Self {
            sender: Some(sender),
            health,
            thread: Some(thread),
            sign_timeout,
            device,
        })
    }

    /// Which device and auth key this backend uses (for logs; no secret).
    pub fn device(&self) -> &str {
        &self.device
    }

    /// **Backup.** Generates a key like [`KeyBackend::generate`] but **with** the
    /// `exportable-under-wrap` capability, so that it can be exported encrypted under a wrap key
    /// with [`YubiHsmBackend::export_wrapped`]. Only for an operator who asked for a wrapped
    /// backup of this key by name.
    ///
    /// # Security
    /// Anyone holding the wrap key and the exported blob can import the key into another
    /// YubiHSM 2. Never the default.
    pub async fn generate_with_wrapped_backup(&self, label: &str) -> Result<KeyInfo, BackendError> {
        check_label(label)?;
        self.key_op(Op::Generate {
            label: label.to_owned(),
            exportable: true,
        })
        .await
    }

    /// **Backup.** Exports `key` encrypted under the wrap key `wrap_key_id` (the device refuses
    /// unless the key was generated by [`YubiHsmBackend::generate_with_wrapped_backup`]).
    /// Returns the wrapped blob (nonce ‖ ciphertext) as the device produced it.
    pub async fn export_wrapped(
        &self,
        key: &KeyRef,
        wrap_key_id: u16,
    ) -> Result<Vec<u8>, BackendError> {
        let object_id = object_id(key)?;
        match self
            .submit(
                Op::ExportWrapped {
                    object_id,
                    wrap_key_id,
                },
                ADMIN_TIMEOUT,
            )
            .await?
        {
            Reply::Bytes(blob) => Ok(blob),
            _ => Err(unexpected_reply()),
        }
    }

    /// Reads the device's own audit log (`Get Log Entries`). Does not acknowledge the entries.
    pub async fn audit_log(&self) -> Result<DeviceLog, BackendError> {
        match self.submit(Op::AuditLog, ADMIN_TIMEOUT).await? {
            Reply::Log(log) => Ok(log),
            _ => Err(unexpected_reply()),
        }
    }

    /// Acknowledges the device's audit log up to and including entry `item` (`Set Log Index`),
    /// so that with forced audit on the device keeps executing logged commands. Call it only
    /// with the item of an entry that was read and archived.
    pub async fn ack_audit_log(&self, item: u16) -> Result<(), BackendError> {
        match self.submit(Op::AckLog(item), ADMIN_TIMEOUT).await? {
            Reply::Done => Ok(()),
            _ => Err(unexpected_reply()),
        }
    }

    /// Queues `op` and waits for its answer without blocking the runtime.
    async fn submit(&self, op: Op, timeout: Duration) -> Result<Reply, BackendError> {
        if let Health::Recovering { reason } = self.health() {
            return Err(BackendError::Unavailable(reason));
        }
        let sender = self.sender.as_ref().ok_or(BackendError::Stopped)?;
        let deadline = Instant::now() + timeout;
        let (reply, answer) = oneshot::channel();
        sender
            .try_send(Job {
                op,
                deadline,
                timeout,
                reply,
            })
            .map_err(|e| match e {
                TrySendError::Full(_) => BackendError::Unavailable(format!(
                    "{} is busy and its queue is full",
                    self.device
                )),
                TrySendError::Disconnected(_) => BackendError::Stopped,
            })?;
        match tokio::time::timeout_at(deadline.into(), answer).await {
            Err(_elapsed) => Err(BackendError::Timeout(timeout)),
            Ok(Err(_closed)) => Err(BackendError::Stopped),
            Ok(Ok(result)) => result,
        }
    }

    async fn key_op(&self, op: Op) -> Result<KeyInfo, BackendError> {
        match self.submit(op, ADMIN_TIMEOUT).await? {
            Reply::Key(info) => Ok(info),
            _ => Err(unexpected_reply()),
        }
    }
}

impl KeyBackend for YubiHsmBackend {
    async fn generate(&self, label: &str) -> Result<KeyInfo, BackendError> {
        check_label(label)?;
        self.key_op(Op::Generate {
            label: label.to_owned(),
            exportable: false,
        })
        .await
    }

    async fn key_info(&self, key: &KeyRef) -> Result<KeyInfo, BackendError> {
        let object_id = object_id(key)?;
        self.key_op(Op::KeyInfo(object_id)).await
    }

    async fn find_by_label(&self, label: &str) -> Result<KeyInfo, BackendError> {
        check_label(label)?;
        self.key_op(Op::FindByLabel(label.to_owned())).await
    }

    async fn sign(
        &self,
        key: &KeyRef,
        expected: &VerifyingKey,
        request: SignRequest,
    ) -> Result<EthSignature, BackendError> {
        // A digest signer: the payload is for devices that show it.
        let object_id = object_id(key)?;
        let op = Op::Sign {
            object_id,
            expected: *expected,
            digest: request.digest,
        };
        match self.submit(op, self.sign_timeout).await? {
            Reply::Signature(signature) => Ok(signature),
            _ => Err(unexpected_reply()),
        }
    }

    async fn destroy(&self, key: &KeyRef) -> Result<(), BackendError> {
        let object_id = object_id(key)?;
        match self.submit(Op::Destroy(object_id), ADMIN_TIMEOUT).await? {
            Reply::Done => Ok(()),
            _ => Err(unexpected_reply()),
        }
    }

    fn health(&self) -> Health {
        // A worker that ended (the `yubihsm` client panicked, say) serves nothing more.
        if self.thread.as_ref().is_none_or(JoinHandle::is_finished) {
            return Health::Stopped;
        }
        self.health.lock().map_or(Health::Stopped, |h| h.clone())
    }
}

impl Drop for YubiHsmBackend {
    /// Closes the queue and joins the worker (which finishes its current command first).
    fn drop(&mut self) {
        self.sender = None;
        if let Ok(mut h) = self.health.lock() {
            *h = Health::Stopped;
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The worker thread.

enum Op {
    Generate {
        label: String,
        exportable: bool,
    },
    KeyInfo(u16),
    FindByLabel(String),
    Sign {
        object_id: u16,
        expected: VerifyingKey,
        digest: B256,
    },
    Destroy(u16),
    ExportWrapped {
        object_id: u16,
        wrap_key_id: u16,
    },
    AuditLog,
    AckLog(u16),
}

enum Reply {
    Key(KeyInfo),
    Signature(EthSignature),
    Bytes(Vec<u8>),
    Log(DeviceLog),
    Done,
}

struct Job {
    op: Op,
    deadline: Instant,
    timeout: Duration,
    reply: oneshot::Sender<Result<Reply, BackendError>>,
}

/// How a failed command is handled.
enum Failure {
    /// The connection or session is gone: reconnect, then retry once.
    Lost(String),
    /// A final answer for the caller.
    Fail(BackendError),
}

struct Worker {
    connector: Connector,
    credentials: Credentials,
    client: Option<Client>,
    device: String,
    domain: Domain,
    health: Arc<Mutex<Health>>,
    backoff: Duration,
    next_attempt: Instant,
}

impl Worker {
    fn run(mut self, jobs: &Receiver<Job>) {
        let mut last_command = Instant::now();
        loop {
            let wait = if self.client.is_some() {
                KEEPALIVE.saturating_sub(last_command.elapsed())
            } else {
                self.next_attempt.saturating_duration_since(Instant::now())
            };
            match jobs.recv_timeout(wait.max(Duration::from_millis(1))) {
                Ok(job) => {
                    last_command = Instant::now();
                    self.serve(job);
                }
                Err(RecvTimeoutError::Timeout) => {
                    last_command = Instant::now();
                    self.keepalive();
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        // Dropping the client closes its session on the device.
        self.client = None;
    }

    fn serve(&mut self, job: Job) {
        if job.reply.is_closed() {
            return; // The caller went away while queued: do not sign for nobody.
        }
        if Instant::now() >= job.deadline {
            let _ = job.reply.send(Err(BackendError::Timeout(job.timeout)));
            return;
        }
        let result = match self.attempt(&job.op) {
            Ok(reply) => Ok(reply),
            Err(Failure::Fail(e)) => Err(e),
            Err(Failure::Lost(reason)) => {
                // One reconnection and one retry, within the caller's deadline.
                self.lost(&reason);
                if Instant::now() < job.deadline && self.reconnect() {
                    match self.attempt(&job.op) {
                        Ok(reply) => Ok(reply),
                        Err(Failure::Fail(e)) => Err(e),
                        Err(Failure::Lost(reason)) => {
                            self.lost(&reason);
                            Err(BackendError::Unavailable(reason))
                        }
                    }
                } else {
                    Err(BackendError::Unavailable(self.reason()))
                }
            }
        };
        let _ = job.reply.send(result);
    }

    /// Pings an idle session, or retries a lost connection when its backoff has passed.
    fn keepalive(&mut self) {
        match &self.client {
            Some(client) => {
                if let Err(e) = client.ping() {
                    let reason = format!("{}: keepalive failed: {e}", self.device);
                    tracing::warn!(device = %self.device, error = %e, "YubiHSM keepalive failed");
                    self.lost(&reason);
                    self.reconnect();
                }
            }
            None => {
                if Instant::now() >= self.next_attempt {
                    self.reconnect();
                }
            }
        }
    }

    fn lost(&mut self, reason: &str) {
        self.client = None;
        self.set_health(Health::Recovering {
            reason: reason.to_owned(),
        });
    }

    /// One reconnection attempt; on failure schedules the next one with backoff.
    fn reconnect(&mut self) -> bool {
        match connect(&self.connector, &self.credentials, &self.device) {
            Ok(client) => {
                tracing::info!(device = %self.device, "YubiHSM session re-established");
                self.client = Some(client);
                self.backoff = BACKOFF_MIN;
                self.set_health(Health::Ready);
                true
            }
            Err(e) => {
                let fatal = matches!(e, BackendError::AuthFailed { .. });
                tracing::warn!(device = %self.device, error = %e, "YubiHSM reconnection failed");
                self.set_health(Health::Recovering {
                    reason: e.to_string(),
                });
                // A refused password is not retried quickly: nothing will change until an
                // operator acts, and the device logs every failed authentication.
                self.backoff = if fatal {
                    BACKOFF_MAX * 15
                } else {
                    (self.backoff * 2).min(BACKOFF_MAX)
                };
                self.next_attempt = Instant::now() + self.backoff;
                false
            }
        }
    }

    fn reason(&self) -> String {
        match self.health.lock() {
            Ok(h) => match &*h {
                Health::Recovering { reason } => reason.clone(),
                _ => format!("{} is unavailable", self.device),
            },
            Err(_) => format!("{} is unavailable", self.device),
        }
    }

    fn set_health(&self, health: Health) {
        if let Ok(mut h) = self.health.lock()
            && *h != Health::Stopped
        {
            *h = health;
        }
    }

    fn attempt(&self, op: &Op) -> Result<Reply, Failure> {
        let Some(client) = self.client.as_ref() else {
            return Err(Failure::Lost(format!("{} is not connected", self.device)));
        };
        let dev = |command: &str| {
            let device = self.device.clone();
            let command = command.to_owned();
            move |e: ::yubihsm::client::Error| classify(&device, &command, &e)
        };
        match op {
            Op::Generate { label, exportable } => {
                if !find_labelled(client, label)
                    .map_err(dev("List Objects"))?
                    .is_empty()
                {
                    return Err(Failure::Fail(BackendError::KeyExists(label.clone())));
                }
                let mut capabilities = Capability::SIGN_ECDSA;
                if *exportable {
                    capabilities |= Capability::EXPORTABLE_UNDER_WRAP;
                }
                let label_value = Label::from(label.as_str());
                let object_id = free_object_id(client).map_err(dev("List Objects"))?;
                let object_id = client
                    .generate_asymmetric_key(
                        object_id,
                        label_value,
                        self.domain,
                        capabilities,
                        asymmetric::Algorithm::EcK256,
                    )
                    .map_err(dev("Generate Asymmetric Key"))?;
                tracing::info!(device = %self.device, object_id, %label, exportable,
                    "generated secp256k1 key on the YubiHSM");
                read_key(client, object_id, &self.device).map(Reply::Key)
            }
            Op::KeyInfo(object_id) => read_key(client, *object_id, &self.device).map(Reply::Key),
            Op::FindByLabel(label) => {
                let found = find_labelled(client, label).map_err(dev("List Objects"))?;
                match found.as_slice() {
                    [object_id] => read_key(client, *object_id, &self.device).map(Reply::Key),
                    [] => Err(Failure::Fail(BackendError::KeyNotFound(format!(
                        "no YubiHSM key labelled {label:?}"
                    )))),
                    _ => Err(Failure::Fail(BackendError::KeyExists(format!(
                        "{label} ({} YubiHSM objects carry this label)",
                        found.len()
                    )))),
                }
            }
            Op::Sign {
                object_id,
                expected,
                digest,
            } => {
                let der = client
                    .sign_ecdsa_prehash_raw(*object_id, digest.as_slice())
                    .map_err(dev("Sign ECDSA"))?;
                ecdsa::eth_signature_from_der(digest, expected, &der)
                    .map(Reply::Signature)
                    .map_err(Failure::Fail)
            }
            Op::Destroy(object_id) => {
                client
                    .delete_object(*object_id, object::Type::AsymmetricKey)
                    .map_err(dev("Delete Object"))?;
                tracing::warn!(device = %self.device, object_id, "destroyed YubiHSM key");
                Ok(Reply::Done)
            }
            Op::ExportWrapped {
                object_id,
                wrap_key_id,
            } => {
                let message = client
                    .export_wrapped(*wrap_key_id, object::Type::AsymmetricKey, *object_id)
                    .map_err(dev("Export Wrapped"))?;
                tracing::warn!(device = %self.device, object_id, wrap_key_id,
                    "exported a YubiHSM key under wrap (backup)");
                Ok(Reply::Bytes(message.into_vec()))
            }
            Op::AckLog(item) => {
                client.set_log_index(*item).map_err(dev("Set Log Index"))?;
                tracing::info!(device = %self.device, item, "acknowledged the YubiHSM audit log");
                Ok(Reply::Done)
            }
            Op::AuditLog => {
                let log = client.get_log_entries().map_err(dev("Get Log Entries"))?;
                Ok(Reply::Log(DeviceLog {
                    unlogged_boot_events: log.unlogged_boot_events,
                    unlogged_auth_events: log.unlogged_auth_events,
                    entries: log
                        .entries
                        .iter()
                        .map(|e| DeviceLogEntry {
                            item: e.item,
                            command: format!("{:?}", e.cmd),
                            length: e.length,
                            session_key: e.session_key,
                            target_key: e.target_key,
                            second_key: e.second_key,
                            result: format!("{:?}", e.result),
                            tick: e.tick,
                            digest: hex::encode(e.digest.as_ref()),
                        })
                        .collect(),
                }))
            }
        }
    }
}

/// Opens a client and authenticates (the `yubihsm` client re-opens expired sessions itself with
/// the cached credentials).
fn connect(
    connector: &Connector,
    credentials: &Credentials,
    device: &str,
) -> Result<Client, BackendError> {
    let client = Client::open(connector.clone(), credentials.clone(), true).map_err(|e| {
        match classify(device, "Create Session", &e) {
            Failure::Lost(reason) => BackendError::Unavailable(reason),
            Failure::Fail(e) => e,
        }
    })?;
    client
        .ping()
        .map_err(|e| match classify(device, "Echo", &e) {
            Failure::Lost(reason) => BackendError::Unavailable(reason),
            Failure::Fail(e) => e,
        })?;
    Ok(client)
}

/// Sorts a `yubihsm` error into "the connection is gone" and a typed final error.
fn classify(device: &str, command: &str, e: &::yubihsm::client::Error) -> Failure {
    use ::yubihsm::device::ErrorKind as Dev;
    match e.kind() {
        ClientErrorKind::AuthenticationError => Failure::Fail(BackendError::AuthFailed {
            device: device.to_owned(),
            reason: e.to_string(),
        }),
        ClientErrorKind::ConnectorError
        | ClientErrorKind::ClosedSessionError
        | ClientErrorKind::ProtocolError => {
            Failure::Lost(format!("{device}: {command} failed: {e}"))
        }
        ClientErrorKind::CreateFailed => match e.device_error() {
            Some(Dev::AuthenticationFailed) => Failure::Fail(BackendError::AuthFailed {
                device: device.to_owned(),
                reason: e.to_string(),
            }),
            _ => Failure::Lost(format!("{device}: {command} failed: {e}")),
        },
        ClientErrorKind::DeviceError | ClientErrorKind::ResponseError => match e.device_error() {
            Some(Dev::ObjectNotFound) => Failure::Fail(BackendError::KeyNotFound(format!(
                "{device}: {command}: object not found"
            ))),
            Some(Dev::AuthenticationFailed) => Failure::Fail(BackendError::AuthFailed {
                device: device.to_owned(),
                reason: e.to_string(),
            }),
            Some(Dev::InvalidSession | Dev::SessionsFull) => {
                Failure::Lost(format!("{device}: {command} failed: {e}"))
            }
            _ => Failure::Fail(BackendError::YubiHsm {
                command: command.to_owned(),
                reason: e.to_string(),
            }),
        },
    }
}

/// Object ids of the asymmetric keys carrying `label`.
fn find_labelled(client: &Client, label: &str) -> Result<Vec<u16>, ::yubihsm::client::Error> {
    let entries = client.list_objects(&[
        Filter::Type(object::Type::AsymmetricKey),
        Filter::Label(Label::from(label)),
    ])?;
    Ok(entries.iter().map(|e| e.object_id).collect())
}

/// An unused asymmetric-key object id: one above the highest in use, so that an id whose key
/// was destroyed is not handed to a new key while the registry may still name it (the lowest
/// free id once the top is reached). Chosen here rather than by the device (id 0) so that the
/// choice is the same on MockHsm, which does not implement the device's choice.
fn free_object_id(client: &Client) -> Result<u16, ::yubihsm::client::Error> {
    let used: std::collections::BTreeSet<u16> = client
        .list_objects(&[Filter::Type(object::Type::AsymmetricKey)])?
        .iter()
        .map(|e| e.object_id)
        .collect();
    let above = used.last().map_or(Some(1), |max| max.checked_add(1));
    Ok(match above {
        Some(id) if id <= 0xfffe => id,
        // Every id up to 0xfffe taken is impossible (the device holds 256 objects).
        _ => (1..=0xfffe).find(|id| !used.contains(id)).unwrap_or(1),
    })
}

/// Reads and checks a key: an `EcK256` asymmetric key with `sign-ecdsa`, and its public key.
fn read_key(client: &Client, object_id: u16, device: &str) -> Result<KeyInfo, Failure> {
    let key_ref = KeyRef::YubiHsm { object_id };
    let fail = |e: &::yubihsm::client::Error, command: &str| classify(device, command, e);
    let info = client
        .get_object_info(object_id, object::Type::AsymmetricKey)
        .map_err(|e| fail(&e, "Get Object Info"))?;
    let mismatch = |reason: String| {
        Failure::Fail(BackendError::KeyMismatch {
            key: key_ref.to_string(),
            reason,
        })
    };
    if info.algorithm != ::yubihsm::Algorithm::Asymmetric(asymmetric::Algorithm::EcK256) {
        return Err(mismatch(format!(
            "algorithm is {:?}, not secp256k1 (EcK256)",
            info.algorithm
        )));
    }
    if !info.capabilities.contains(Capability::SIGN_ECDSA) {
        return Err(mismatch("the key lacks the sign-ecdsa capability".into()));
    }
    let public = client
        .get_public_key(object_id)
        .map_err(|e| fail(&e, "Get Public Key"))?;
    // The device returns the point as X ‖ Y (64 bytes) without the SEC1 tag.
    if public.as_slice().len() != 64 {
        return Err(mismatch(format!(
            "public key is {} bytes, expected 64",
            public.as_slice().len()
        )));
    }
    let mut sec1 = [0u8; 65];
    sec1[0] = 0x04;
    sec1[1..].copy_from_slice(public.as_slice());
    let public_key = VerifyingKey::from_sec1_bytes(&sec1)
        .map_err(|_| mismatch("public key is not a secp256k1 point".into()))?;
    Ok(KeyInfo {
        key_ref,
        public_key,
        address: Address::from_public_key(&public_key),
    })
}

fn object_id(key: &KeyRef) -> Result<u16, BackendError> {
    match key {
        KeyRef::YubiHsm { object_id } => Ok(*object_id),
        other => Err(BackendError::KeyNotFound(format!(
            "{other} is not a YubiHSM key"
        ))),
    }
}

fn check_label(label: &str) -> Result<(), BackendError> {
    if label.is_empty() || label.len() > MAX_LABEL {
        return Err(BackendError::Unsupported(format!(
            "a YubiHSM label is 1 to {MAX_LABEL} bytes, {label:?} is {}",
            label.len()
        )));
    }
    Ok(())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn unexpected_reply() -> BackendError {
    BackendError::Unavailable("internal error: unexpected worker reply".into())
}
