//! Worker threads: each owns one session (a cryptoki `Session` is `Send`, not `Sync`) and serves
//! jobs from the pool's bounded channel, replying on a oneshot.
//!
//! Signing is a two-stage pipeline: the worker makes the `C_Sign` call and hands the device's
//! `r‖s` to a verifier thread, which converts and verifies it (one double-scalar multiplication
//! from the key's precomputed tables, ≈ 32 µs against ≈ 500 µs for SoftHSM's `C_Sign`) and
//! replies. The session is free for the next `C_Sign` while the previous signature is being
//! verified.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use alloy::primitives::B256;
use cryptoki::context::Function;
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;
use k256::ecdsa::VerifyingKey;
use tokio::sync::oneshot;

use super::errors::Loss;
use super::pool::{Library, Shared};
use super::token::{self, OpError};
use crate::backend::{BackendError, EthSignature, KeyInfo, KeyRef, ecdsa};

/// One operation for a worker.
pub(super) enum Op {
    Generate(String),
    KeyInfo(KeyRef),
    FindByLabel(String),
    Sign {
        key: KeyRef,
        expected: VerifyingKey,
        digest: B256,
    },
    Destroy(KeyRef),
}

/// A worker's answer.
pub(super) enum Reply {
    Key(KeyInfo),
    Signature(EthSignature),
    Done,
}

/// What the worker answers internally for a signature: the device's raw output, to verify.
enum Done {
    Reply(Reply),
    RawSignature(Vec<u8>),
}

/// A device signature on its way to the verifier.
pub(super) struct Verify {
    rs: Vec<u8>,
    digest: B256,
    expected: VerifyingKey,
    reply: oneshot::Sender<Result<Reply, BackendError>>,
}

/// The verifier stage: converts device signatures to verified Ethereum signatures and replies.
///
/// Each key's table of precomputed multiples is built on its first signature and kept in
/// `prepared` (shared by the verifier threads), which makes the verification about four times
/// cheaper than without.
///
/// A signature that does not verify (a cached handle that now names another key, a device
/// fault) also makes every worker drop its cached handles.
pub(super) fn verifier(
    shared: &Shared,
    jobs: &Mutex<Receiver<Verify>>,
    prepared: &ecdsa::PreparedKeyCache,
) {
    ecdsa::prepare_generator();
    loop {
        let job = {
            let rx = jobs.lock().unwrap_or_else(|e| e.into_inner());
            rx.recv()
        };
        let Ok(job) = job else { break };
        if job.reply.is_closed() {
            continue;
        }
        let key = prepared.get(&job.expected);
        let result = ecdsa::eth_signature_from_rs_prepared(&job.digest, &key, &job.rs);
        if result.is_err() {
            shared.objects_epoch.fetch_add(1, Ordering::AcqRel);
        }
        let _ = job.reply.send(result.map(Reply::Signature));
    }
}

/// A queued request.
pub(super) struct Job {
    pub(super) op: Op,
    pub(super) deadline: Instant,
    /// The caller's timeout (for the error when the deadline passed in the queue).
    pub(super) timeout: Duration,
    pub(super) reply: oneshot::Sender<Result<Reply, BackendError>>,
}

/// A worker's session and what it has learnt in it.
struct WorkerSession {
    session: Session,
    /// The module generation the session was opened in.
    generation: u64,
    /// The recovery epoch the cache belongs to.
    epoch: u64,
    /// The destroy counter the cache belongs to.
    objects_epoch: u64,
    /// Private key handles by reference; valid only in this session.
    cache: HashMap<KeyRef, ObjectHandle>,
}

/// A worker thread's state.
pub(super) struct Worker {
    shared: Arc<Shared>,
    session: Option<WorkerSession>,
    verify: SyncSender<Verify>,
}

/// How long an in-flight request whose session died may wait for the recovery before its single
/// retry (it also never waits past its own deadline).
const RETRY_WAIT: Duration = Duration::from_secs(1);

impl Worker {
    /// A worker that starts with `session` (opened in module generation `generation`).
    pub(super) fn new(
        shared: Arc<Shared>,
        session: Session,
        generation: u64,
        verify: SyncSender<Verify>,
    ) -> Self {
        let epoch = shared.epoch.load(Ordering::Acquire);
        let objects_epoch = shared.objects_epoch.load(Ordering::Acquire);
        Self {
            shared,
            session: Some(WorkerSession {
                session,
                generation,
                epoch,
                objects_epoch,
                cache: HashMap::new(),
            }),
            verify,
        }
    }

    /// Serves jobs until the channel closes.
    pub(super) fn run(mut self, jobs: &Mutex<Receiver<Job>>) {
        loop {
            // Only one idle worker waits in recv at a time; the others wait for the mutex.
            let job = {
                let rx = jobs.lock().unwrap_or_else(|e| e.into_inner());
                rx.recv()
            };
            let Ok(job) = job else { break };
            if job.reply.is_closed() {
                // The caller went away while queued: do not sign for nobody.
                continue;
            }
            if Instant::now() >= job.deadline {
                let _ = job.reply.send(Err(BackendError::Timeout(job.timeout)));
                continue;
            }
            let result = match self.shared.check_ready() {
                Ok(()) => self.execute(&job.op, job.deadline),
                Err(e) => Err(e),
            };
            match (result, job.op) {
                (
                    Ok(Done::RawSignature(rs)),
                    Op::Sign {
                        expected, digest, ..
                    },
                ) => {
                    // Blocks when the verifiers are behind: back-pressure onto the job queue.
                    let verify = Verify {
                        rs,
                        digest,
                        expected,
                        reply: job.reply,
                    };
                    if let Err(unsent) = self.verify.send(verify) {
                        let _ = unsent.0.reply.send(Err(BackendError::Stopped));
                    }
                }
                (Ok(Done::RawSignature(_)), _) => {
                    let _ = job.reply.send(Err(BackendError::Unavailable(
                        "internal error: a signature for a non-signing request".into(),
                    )));
                }
                (Ok(Done::Reply(reply)), _) => {
                    let _ = job.reply.send(Ok(reply));
                }
                (Err(e), _) => {
                    let _ = job.reply.send(Err(e));
                }
            }
        }
        self.close();
    }

    /// Runs `op`; a request whose session turned out dead is retried once, on a fresh session,
    /// after the keeper has recovered — never more.
    fn execute(&mut self, op: &Op, deadline: Instant) -> Result<Done, BackendError> {
        let (loss, reason, epoch) = match self.attempt(op) {
            Ok(reply) => return Ok(reply),
            Err((OpError::Lost { loss, reason }, epoch)) => (loss, reason, epoch),
            Err((other, _)) => return Err(other.into_backend_error()),
        };
        self.lost(loss);
        self.shared.report_lost(loss, reason.clone(), epoch);
        let wait_until = deadline.min(Instant::now() + RETRY_WAIT);
        if !self.shared.wait_ready(wait_until) {
            return Err(BackendError::Unavailable(reason));
        }
        match self.attempt(op) {
            Ok(reply) => Ok(reply),
            Err((OpError::Lost { loss, reason }, epoch)) => {
                self.lost(loss);
                self.shared.report_lost(loss, reason.clone(), epoch);
                Err(BackendError::Unavailable(reason))
            }
            Err((other, _)) => Err(other.into_backend_error()),
        }
    }

    /// One try, under the module's read lock. On failure also returns the recovery epoch the
    /// session belonged to.
    fn attempt(&mut self, op: &Op) -> Result<Done, (OpError, u64)> {
        let shared = Arc::clone(&self.shared);
        let lib = shared.read_lib();
        let epoch = shared.epoch.load(Ordering::Acquire);
        let ws = self.ensure_session(&lib).map_err(|e| (e, epoch))?;
        let epoch = ws.epoch;
        let session = &ws.session;
        let result = match op {
            Op::Generate(label) => {
                let _admin = shared.admin_lock();
                token::generate(session, label).map(|k| Done::Reply(Reply::Key(k)))
            }
            Op::KeyInfo(key) => token::read_key(session, key).map(|k| Done::Reply(Reply::Key(k))),
            Op::FindByLabel(label) => {
                token::find_by_label(session, label).map(|k| Done::Reply(Reply::Key(k)))
            }
            Op::Sign { key, digest, .. } => match sign(ws, key, digest) {
                // A key that passed the self-check is missing: tell a token that went away (or
                // a login renewed under the look-up) from a destroyed key.
                Err(OpError::Fail(BackendError::KeyNotFound(what))) => {
                    Err(missing_key(&shared, &lib, epoch, what))
                }
                other => other.map(Done::RawSignature),
            },
            Op::Destroy(key) => {
                let _admin = shared.admin_lock();
                let result = token::destroy(session, key).map(|()| Done::Reply(Reply::Done));
                // Other workers' cached handles for this key are now dangling.
                shared.objects_epoch.fetch_add(1, Ordering::AcqRel);
                ws.cache.remove(key);
                result
            }
        };
        result.map_err(|e| (e, epoch))
    }

    /// The worker's session, reopened if it was lost or belongs to an older module generation.
    fn ensure_session(&mut self, lib: &Library) -> Result<&mut WorkerSession, OpError> {
        let epoch = self.shared.epoch.load(Ordering::Acquire);
        let objects_epoch = self.shared.objects_epoch.load(Ordering::Acquire);
        if self
            .session
            .as_ref()
            .is_some_and(|ws| ws.generation != lib.generation)
        {
            // Opened before a C_Finalize: the handle is meaningless now (and may have been
            // reused by another session), so forget it without C_CloseSession.
            self.session = None;
        }
        if self.session.is_none() {
            let session = lib
                .ctx
                .open_rw_session_no_drop(lib.slot)
                .map_err(|e| OpError::ck(e, Function::OpenSession))?;
            self.session = Some(WorkerSession {
                session,
                generation: lib.generation,
                epoch,
                objects_epoch,
                cache: HashMap::new(),
            });
        }
        let Some(ws) = self.session.as_mut() else {
            // Set just above; unreachable, but no panic in the signer.
            return Err(OpError::Fail(BackendError::Unavailable(
                "worker session missing".into(),
            )));
        };
        if ws.epoch != epoch || ws.objects_epoch != objects_epoch {
            // After a recovery (e.g. a re-login) or a destroy, cached handles may be stale.
            ws.cache.clear();
            ws.epoch = epoch;
            ws.objects_epoch = objects_epoch;
        }
        Ok(ws)
    }

    /// Drops what a loss made useless.
    fn lost(&mut self, loss: Loss) {
        match loss {
            // The session handle is dead: forget it (never close a dead handle; it may be
            // reused). A device loss ends in C_Finalize, which kills it anyway.
            Loss::Session | Loss::Device => self.session = None,
            // The session is still valid; the keeper's new login covers it again.
            Loss::Login => {
                if let Some(ws) = self.session.as_mut() {
                    ws.cache.clear();
                }
            }
        }
    }

    fn close(&mut self) {
        if let Some(ws) = self.session.take() {
            let shared = Arc::clone(&self.shared);
            let lib = shared.read_lib();
            if ws.generation == lib.generation {
                let _ = ws.session.close();
            }
        }
    }
}

/// Why a signing key was not found in a logged-in session that belongs to recovery `epoch`.
fn missing_key(shared: &Shared, lib: &Library, epoch: u64, what: String) -> OpError {
    if shared.epoch.load(Ordering::Acquire) != epoch {
        // The keeper logged in again while the look-up ran in a session not yet covered by the
        // login: the key was merely invisible. The worker retries once on a fresh session.
        return OpError::Lost {
            loss: Loss::Session,
            reason: format!("key {what} was invisible while the login was renewed"),
        };
    }
    match super::pool::token_present(lib, &shared.login.token_label) {
        Ok(()) => OpError::Fail(BackendError::KeyNotFound(what)),
        Err((loss, reason)) => OpError::Lost {
            loss,
            reason: format!("key {what} not found: {reason}"),
        },
    }
}

/// Signs with the cached private key handle (a stale handle is looked up again once); returns
/// the device's raw output for the verifier.
fn sign(ws: &mut WorkerSession, key: &KeyRef, digest: &B256) -> Result<Vec<u8>, OpError> {
    let (label, id) = token::pkcs11_ref(key)?;
    let mut cached = true;
    loop {
        let handle = match ws.cache.get(key) {
            Some(handle) => *handle,
            None => {
                cached = false;
                let handle = token::find_private(&ws.session, key, label, &id)?;
                ws.cache.insert(key.clone(), handle);
                handle
            }
        };
        match token::sign_digest(&ws.session, handle, digest) {
            Ok(rs) => return Ok(rs),
            Err(OpError::Stale(_)) if cached => {
                // E.g. the key was destroyed and re-created, or the login was renewed: look it
                // up again (which also tells a lost login from a missing key).
                ws.cache.remove(key);
            }
            Err(e) => {
                ws.cache.remove(key);
                return Err(e);
            }
        }
    }
}
