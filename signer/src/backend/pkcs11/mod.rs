//! PKCS#11 key backend: SoftHSM in tests; YubiHSM 2's PKCS#11 module, Nitrokey HSM, AWS CloudHSM
//! and Thales Luna in production.
//!
//! # Design
//! - The token is found by its **label** (slot ids change when tokens are initialised or
//!   re-plugged) and the user logs in with a PIN read from a file or the environment.
//! - A pool of `sessions` worker threads each owns one session and serves requests from a bounded
//!   channel, replying on a oneshot: async callers never block, and when every worker is busy
//!   and the queue is full a request fails at once with [`BackendError::Unavailable`].
//! - Signatures go through a second stage of verifier threads (one per session, at most one per
//!   core) that convert `r‖s` to a verified Ethereum signature, so a session starts its next
//!   `C_Sign` while the previous signature is being verified. They share a cache of each key's
//!   precomputed verification table ([`super::ecdsa::PreparedKeyCache`], built on a key's first
//!   signature, ≈ 200 KiB a key, at most 256 keys).
//! - One more session, held by a keeper thread, keeps the login alive (closing a process's last
//!   session logs it out and invalidates object handles) and is pinged every 500 ms.
//! - Workers look keys up by label and id in their own session and cache the object handles per
//!   session; a stale handle is looked up again once.
//! - When a session, the login or the device is lost (`CKR_SESSION_HANDLE_INVALID`,
//!   `CKR_SESSION_CLOSED`, `CKR_USER_NOT_LOGGED_IN`, `CKR_DEVICE_REMOVED`,
//!   `CKR_TOKEN_NOT_PRESENT`, `CKR_DEVICE_ERROR`, `CKR_CRYPTOKI_NOT_INITIALIZED`, …),
//!   [`KeyBackend::health`] turns to [`Health::Recovering`], new requests fail fast, and the
//!   keeper recovers with exponential backoff (10 ms doubling to 250 ms): first by logging in
//!   again or reopening its session, then by `C_Finalize` + `C_Initialize` (the only way most modules
//!   notice a re-plugged device) and finding the token by label again. A request whose session
//!   died under it is retried once on a fresh session. A refused PIN during recovery stops the
//!   retries, because retrying would lock the PIN.
//! - A token can vanish while the process's sessions still look logged in (SoftHSM keeps the
//!   session state in memory when the token's files go away): the keeper's ping also reads
//!   `C_GetTokenInfo`, and a signing key missing from a logged-in session is checked the same
//!   way, so either is treated as a device loss rather than as a missing key.
//!
//! # Limits
//! `C_Finalize` acts on the whole module in this process: configure at most one backend per
//! module path per process (several tokens of one module need one backend each, in processes of
//! their own, or a shared module lock, which this backend does not have yet).

mod config;
mod errors;
mod pool;
mod token;
mod worker;

use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cryptoki::context::{Function, Pkcs11};
use cryptoki::mechanism::MechanismType;
use cryptoki::session::Session;
use k256::ecdsa::VerifyingKey;
use tokio::sync::oneshot;

pub use config::{MAX_SESSIONS, PinSource, Pkcs11Config};
pub use token::{SECP256K1_EC_PARAMS, parse_ec_point};

use self::config::TokenLogin;
use self::pool::{Library, Shared};
use self::token::OpError;
use self::worker::{Job, Op, Reply, Verify, Worker};
use super::{BackendError, EthSignature, Health, KeyBackend, KeyInfo, KeyRef, SignRequest};

/// Queued requests per worker before new ones are refused with `Unavailable`. Deep enough for
/// the burst a group commit releases at once (every request decided in one fsync reaches the
/// queue together); each waits at most its own `sign_timeout`.
const QUEUE_PER_SESSION: usize = 64;

/// Deadline of generate, destroy and key look-ups (not latency-sensitive; RSA-era HSMs can take
/// seconds to generate).
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A PKCS#11 token used as a [`KeyBackend`].
///
/// # Security
/// The backend never reads key material: keys are generated on the token as sensitive,
/// non-extractable, sign-only objects; every signature is checked against the expected public key
/// before it is returned (see [`super::ecdsa`]). The PIN lives in a zeroizing secret and appears
/// in no error, log line or `Debug` output.
pub struct Pkcs11Backend {
    shared: Arc<Shared>,
    sender: Option<SyncSender<Job>>,
    threads: Vec<JoinHandle<()>>,
    sessions: usize,
    sign_timeout: Duration,
    token_label: String,
}

impl std::fmt::Debug for Pkcs11Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Backend")
            .field("token_label", &self.token_label)
            .field("sessions", &self.sessions)
            .field("sign_timeout", &self.sign_timeout)
            .finish_non_exhaustive()
    }
}

impl Pkcs11Backend {
    /// Loads the module, finds the token by label, checks that it supports secp256k1 ECDSA, logs
    /// in, and opens the session pool. This is the backend's self-check: when it returns, the
    /// backend is ready to sign.
    ///
    /// Errors: [`BackendError::ModuleLoad`] (no such module, not a PKCS#11 library),
    /// [`BackendError::TokenNotFound`], [`BackendError::LoginFailed`] (for example
    /// `CKR_PIN_INCORRECT`), [`BackendError::PinSource`], [`BackendError::Unsupported`] (no
    /// `CKM_ECDSA` or `CKM_EC_KEY_PAIR_GEN`), or the failing PKCS#11 call.
    pub fn open(config: &Pkcs11Config) -> Result<Self, BackendError> {
        config.validate()?;
        let pin = config.pin_source()?.read()?;
        let login = TokenLogin {
            token_label: config.token_label.clone(),
            pin,
        };
        let module = config.module.display().to_string();
        if !config.module.is_file() {
            return Err(BackendError::ModuleLoad {
                path: module,
                reason: "no such file".into(),
            });
        }
        let ctx = Pkcs11::new(&config.module).map_err(|e| BackendError::ModuleLoad {
            path: module.clone(),
            reason: e.to_string(),
        })?;
        pool::initialize(&ctx).map_err(|e| ck(e, Function::Initialize))?;
        let slot =
            token::find_token(&ctx, &config.token_label).map_err(OpError::into_backend_error)?;
        let mechanisms = ctx
            .get_mechanism_list(slot)
            .map_err(|e| ck(e, Function::GetMechanismList))?;
        for (needed, name) in [
            (MechanismType::ECC_KEY_PAIR_GEN, "CKM_EC_KEY_PAIR_GEN"),
            (MechanismType::ECDSA, "CKM_ECDSA"),
        ] {
            if !mechanisms.contains(&needed) {
                return Err(BackendError::Unsupported(format!(
                    "token {:?} does not offer {name}",
                    config.token_label
                )));
            }
        }
        let keepalive =
            pool::open_login_session(&ctx, slot, &login).map_err(OpError::into_backend_error)?;
        let mut worker_sessions: Vec<Session> = Vec::with_capacity(config.sessions);
        for _ in 0..config.sessions {
            match ctx.open_rw_session_no_drop(slot) {
                Ok(session) => worker_sessions.push(session),
                Err(e) => {
                    for session in worker_sessions {
                        let _ = session.close();
                    }
                    let _ = keepalive.close();
                    return Err(ck(e, Function::OpenSession));
                }
            }
        }

        let generation = 0;
        let shared = Arc::new(Shared::new(
            login,
            Library {
                ctx,
                slot,
                generation,
            },
        ));
        let (sender, receiver) = sync_channel::<Job>(config.sessions * QUEUE_PER_SESSION);
        let receiver = Arc::new(Mutex::new(receiver));
        // One verifier per session, at most one per core: verification is pure CPU.
        let verifiers = std::thread::available_parallelism()
            .map_or(1, usize::from)
            .min(config.sessions)
            .max(1);
        let (verify_sender, verify_receiver) =
            sync_channel::<Verify>(config.sessions * QUEUE_PER_SESSION);
        let verify_receiver = Arc::new(Mutex::new(verify_receiver));
        let prepared = Arc::new(super::ecdsa::PreparedKeyCache::default());
        let mut backend = Self {
            shared: Arc::clone(&shared),
            sender: Some(sender),
            threads: Vec::with_capacity(2 * config.sessions + 1),
            sessions: config.sessions,
            sign_timeout: config.sign_timeout,
            token_label: config.token_label.clone(),
        };
        let keeper_shared = Arc::clone(&shared);
        backend.spawn("pkcs11-keeper".into(), move || {
            pool::keeper(&keeper_shared, Some(keepalive), generation);
        })?;
        for i in 0..verifiers {
            let verifier_shared = Arc::clone(&shared);
            let receiver = Arc::clone(&verify_receiver);
            let prepared = Arc::clone(&prepared);
            backend.spawn(format!("pkcs11-verify-{i}"), move || {
                worker::verifier(&verifier_shared, &receiver, &prepared);
            })?;
        }
        for (i, session) in worker_sessions.into_iter().enumerate() {
            let worker = Worker::new(
                Arc::clone(&shared),
                session,
                generation,
                verify_sender.clone(),
            );
            let receiver = Arc::clone(&receiver);
            // On a spawn error `backend` is dropped, which stops and joins what did start.
            backend.spawn(format!("pkcs11-worker-{i}"), move || {
                // The module computes or waits for the device here: first on the CPU.
                crate::sched::device_thread();
                worker.run(&receiver);
            })?;
        }
        Ok(backend)
    }

    /// The label of the token this backend signs with.
    pub fn token_label(&self) -> &str {
        &self.token_label
    }

    /// How many recoveries have completed since [`Pkcs11Backend::open`] (for metrics).
    pub fn recoveries(&self) -> u64 {
        self.shared.recoveries()
    }

    /// **Test hook.** Simulates a device reset as this process sees it: `C_Finalize` on the
    /// backend's own module context, which closes every session of the process (the workers' and
    /// the keeper's) and logs the user out, without telling the pool. The pool must notice on its
    /// own (its next call fails with `CKR_CRYPTOKI_NOT_INITIALIZED`) and recover.
    ///
    /// Taken under the module's write lock, so no PKCS#11 call is in flight while the module is
    /// finalised.
    #[doc(hidden)]
    pub fn simulate_device_reset(&self) -> Result<(), BackendError> {
        let lib = self.shared.write_lib();
        lib.ctx
            .clone()
            .finalize()
            .map_err(|e| ck(e, Function::Finalize))
    }

    fn spawn(
        &mut self,
        name: String,
        body: impl FnOnce() + Send + 'static,
    ) -> Result<(), BackendError> {
        let handle = std::thread::Builder::new()
            .name(name)
            .spawn(body)
            .map_err(|e| BackendError::Unavailable(format!("cannot start a thread: {e}")))?;
        self.threads.push(handle);
        Ok(())
    }

    /// Queues `op` and waits for its answer without blocking the runtime.
    async fn submit(&self, op: Op, timeout: Duration) -> Result<Reply, BackendError> {
        self.shared.check_ready()?;
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
                    "all {} sessions of token {:?} are busy and the queue is full",
                    self.sessions, self.token_label
                )),
                TrySendError::Disconnected(_) => BackendError::Stopped,
            })?;
        match tokio::time::timeout_at(deadline.into(), answer).await {
            Err(_elapsed) => Err(BackendError::Timeout(timeout)),
            // The pool dropped the reply without an answer: it is shutting down.
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

impl KeyBackend for Pkcs11Backend {
    async fn generate(&self, label: &str) -> Result<KeyInfo, BackendError> {
        self.key_op(Op::Generate(label.to_owned())).await
    }

    async fn key_info(&self, key: &KeyRef) -> Result<KeyInfo, BackendError> {
        self.key_op(Op::KeyInfo(key.clone())).await
    }

    async fn find_by_label(&self, label: &str) -> Result<KeyInfo, BackendError> {
        self.key_op(Op::FindByLabel(label.to_owned())).await
    }

    async fn sign(
        &self,
        key: &KeyRef,
        expected: &VerifyingKey,
        request: SignRequest,
    ) -> Result<EthSignature, BackendError> {
        // A digest signer: the payload is for devices that show it; the digest is what is signed
        // and what the signature is verified over.
        let op = Op::Sign {
            key: key.clone(),
            expected: *expected,
            digest: request.digest,
        };
        match self.submit(op, self.sign_timeout).await? {
            Reply::Signature(signature) => Ok(signature),
            _ => Err(unexpected_reply()),
        }
    }

    async fn destroy(&self, key: &KeyRef) -> Result<(), BackendError> {
        match self.submit(Op::Destroy(key.clone()), ADMIN_TIMEOUT).await? {
            Reply::Done => Ok(()),
            _ => Err(unexpected_reply()),
        }
    }

    fn health(&self) -> Health {
        self.shared.health()
    }
}

impl Drop for Pkcs11Backend {
    /// Stops the pool: closes the queue, lets workers finish their current call, closes their
    /// sessions and the keeper's (which logs the user out). Blocks for at most one HSM call per
    /// worker.
    fn drop(&mut self) {
        self.sender = None;
        self.shared.stop();
        for handle in self.threads.drain(..) {
            let _ = handle.join();
        }
    }
}

fn ck(error: cryptoki::error::Error, function: Function) -> BackendError {
    errors::pkcs11_error(&error, function)
}

fn unexpected_reply() -> BackendError {
    BackendError::Unavailable("internal error: unexpected worker reply".into())
}
