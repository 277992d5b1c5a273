//! The state shared by the pool's threads, and the keeper thread that holds the login session
//! and recovers the pool when the token, its sessions or the login are lost.
//!
//! # Locks
//! - `lib` (`RwLock<Library>`): every PKCS#11 call runs under its read side; the write side is
//!   taken only to `C_Finalize`/`C_Initialize` the module or to re-establish the login, so no call
//!   is ever in flight while the module is finalised (which modules do not survive).
//! - `state` (`Mutex<State>`): health and the pending loss report.
//!
//! Lock order is `lib` then `state`; `state` is never held while `lib` is acquired.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Function, Pkcs11};
use cryptoki::error::{Error, RvError};
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use tracing::{error, info, warn};

use super::config::TokenLogin;
use super::errors::Loss;
use super::token::{self, OpError};
use crate::backend::{BackendError, Health};

/// How often the keeper checks that its session is alive and logged in.
pub(super) const PING_INTERVAL: Duration = Duration::from_millis(500);
/// First and largest pause between recovery attempts. The largest bounds how long the pool
/// stays down after the token is back (an attempt is a `C_Finalize`/`C_Initialize` and a slot
/// scan: cheap).
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_millis(250);

/// The loaded module and where the token is.
pub(super) struct Library {
    /// The module's function list.
    pub(super) ctx: Pkcs11,
    /// The token's slot (may change when the token is re-plugged; found by label).
    pub(super) slot: Slot,
    /// Incremented on every `C_Finalize`: sessions from an older generation are dead and their
    /// handles may have been reused, so they are forgotten, never closed.
    pub(super) generation: u64,
}

/// Health and the pending loss report.
pub(super) struct State {
    pub(super) health: Health,
    pending: Option<(Loss, String)>,
    stopping: bool,
    /// Recovery gave up for good (a refused PIN: retrying would lock it).
    fatal: bool,
}

/// Everything the pool's threads share.
pub(super) struct Shared {
    pub(super) login: TokenLogin,
    pub(super) lib: RwLock<Library>,
    state: Mutex<State>,
    changed: Condvar,
    /// Incremented (under the `lib` write lock) by every completed recovery. A loss reported
    /// from an older epoch is already dealt with; worker handle caches from an older epoch are
    /// dropped.
    pub(super) epoch: AtomicU64,
    /// Incremented by every destroy, so that workers drop cached object handles.
    pub(super) objects_epoch: AtomicU64,
    /// Serialises generate and destroy (label uniqueness is check-then-create).
    pub(super) admin: Mutex<()>,
    recoveries: AtomicU64,
}

impl Shared {
    pub(super) fn new(login: TokenLogin, library: Library) -> Self {
        Self {
            login,
            lib: RwLock::new(library),
            state: Mutex::new(State {
                health: Health::Ready,
                pending: None,
                stopping: false,
                fatal: false,
            }),
            changed: Condvar::new(),
            epoch: AtomicU64::new(0),
            objects_epoch: AtomicU64::new(0),
            admin: Mutex::new(()),
            recoveries: AtomicU64::new(0),
        }
    }

    // Poisoning: no code path panics while holding these locks (the crate denies unwrap, expect
    // and panic), and the protected data stays consistent at every await-free step, so a
    // poisoned lock is used as is rather than turned into a panic.
    pub(super) fn read_lib(&self) -> RwLockReadGuard<'_, Library> {
        self.lib.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn write_lib(&self) -> RwLockWriteGuard<'_, Library> {
        self.lib.write().unwrap_or_else(|e| e.into_inner())
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn admin_lock(&self) -> MutexGuard<'_, ()> {
        self.admin.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn health(&self) -> Health {
        self.state().health.clone()
    }

    pub(super) fn recoveries(&self) -> u64 {
        self.recoveries.load(Ordering::Relaxed)
    }

    /// Fails fast unless the pool is ready.
    pub(super) fn check_ready(&self) -> Result<(), BackendError> {
        match &self.state().health {
            Health::Ready => Ok(()),
            Health::Recovering { reason } => Err(BackendError::Unavailable(reason.clone())),
            Health::Stopped => Err(BackendError::Stopped),
        }
    }

    /// A worker or the keeper saw a loss while working in `seen_epoch`.
    pub(super) fn report_lost(&self, loss: Loss, reason: String, seen_epoch: u64) {
        let mut state = self.state();
        if state.stopping || seen_epoch < self.epoch.load(Ordering::Acquire) {
            return; // already recovered since that session was used
        }
        if state.pending.is_none() {
            warn!(%reason, ?loss, "PKCS#11 token lost; recovering");
            state.pending = Some((loss, reason.clone()));
        } else if let Some((pending, _)) = &mut state.pending {
            // Escalate: a device loss needs more than a session loss.
            if loss == Loss::Device {
                *pending = Loss::Device;
            }
        }
        if !state.fatal {
            state.health = Health::Recovering { reason };
        }
        self.changed.notify_all();
    }

    /// Waits until the pool is ready again, the deadline passes or the pool stops.
    pub(super) fn wait_ready(&self, deadline: Instant) -> bool {
        let mut state = self.state();
        loop {
            if state.stopping {
                return false;
            }
            if state.health == Health::Ready && state.pending.is_none() {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    pub(super) fn stop(&self) {
        let mut state = self.state();
        state.stopping = true;
        state.health = Health::Stopped;
        self.changed.notify_all();
    }

    /// Sleeps for `pause` unless the pool stops first; true when stopping.
    fn sleep_unless_stopping(&self, pause: Duration) -> bool {
        let deadline = Instant::now() + pause;
        let mut state = self.state();
        loop {
            if state.stopping {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits for a loss report, the ping interval or stop.
    fn wait_for_work(&self) -> Work {
        let deadline = Instant::now() + PING_INTERVAL;
        let mut state = self.state();
        loop {
            if state.stopping {
                return Work::Stop;
            }
            if state.fatal {
                // Gave up: no pings, no login attempts, until the pool is stopped.
                state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            if let Some((loss, _)) = &state.pending {
                return Work::Recover(*loss);
            }
            let now = Instant::now();
            if now >= deadline {
                return Work::Ping;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

enum Work {
    Stop,
    Ping,
    Recover(Loss),
}

/// `C_Initialize` with OS locking; "already initialised" (another user in this process) is fine.
pub(super) fn initialize(ctx: &Pkcs11) -> Result<(), Error> {
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Opens the keeper's session on `slot` and logs in.
pub(super) fn open_login_session(
    ctx: &Pkcs11,
    slot: Slot,
    login: &TokenLogin,
) -> Result<Session, OpError> {
    // Sessions are opened "no drop": a session from a finalised module must be forgotten, not
    // closed (its handle may now belong to someone else), so closing is always explicit.
    let session = ctx
        .open_rw_session_no_drop(slot)
        .map_err(|e| OpError::ck(e, Function::OpenSession))?;
    let logged_in = token::login(&session, &login.token_label, &login.pin)
        .and_then(|()| token::is_logged_in(&session));
    match logged_in {
        Ok(true) => Ok(session),
        Ok(false) => {
            let _ = session.close();
            Err(OpError::Fail(BackendError::LoginFailed {
                token: login.token_label.clone(),
                rv: "session not in a user state after C_Login".into(),
            }))
        }
        Err(e) => {
            let _ = session.close();
            Err(e)
        }
    }
}

/// The keeper thread: holds the session that keeps the login alive (closing a process's last
/// session logs it out), pings it, and recovers the pool with exponential backoff.
pub(super) fn keeper(shared: &Shared, mut session: Option<Session>, mut generation: u64) {
    loop {
        let loss = match shared.wait_for_work() {
            Work::Stop => break,
            Work::Recover(loss) => loss,
            Work::Ping => match ping(shared, session.as_ref()) {
                Ok(()) => continue,
                Err((loss, reason)) => {
                    let epoch = shared.epoch.load(Ordering::Acquire);
                    shared.report_lost(loss, reason, epoch);
                    loss
                }
            },
        };
        recover(shared, &mut session, &mut generation, loss);
    }
    let lib = shared.read_lib();
    if let Some(session) = session
        && lib.generation == generation
    {
        let _ = session.close();
    }
}

fn ping(shared: &Shared, session: Option<&Session>) -> Result<(), (Loss, String)> {
    let lib = shared.read_lib();
    let Some(session) = session else {
        return Err((Loss::Session, "no login session".into()));
    };
    match token::is_logged_in(session) {
        Ok(true) => {}
        Ok(false) => return Err((Loss::Login, "the token logged the session out".into())),
        Err(OpError::Lost { loss, reason }) => return Err((loss, reason)),
        Err(other) => return Err((Loss::Session, other.into_backend_error().to_string())),
    }
    token_present(&lib, &shared.login.token_label)
}

/// Whether the token is still in its slot: the session state alone lives in the module's memory
/// and survives the token's files or device going away (SoftHSM answers `C_GetTokenInfo` with
/// `CKR_GENERAL_ERROR` once the token's directory is gone, and keeps failing until it is
/// re-initialised even after the directory is back).
pub(super) fn token_present(lib: &Library, label: &str) -> Result<(), (Loss, String)> {
    match lib.ctx.get_token_info(lib.slot) {
        Ok(info) if info.label() == label => Ok(()),
        Ok(info) => Err((
            Loss::Device,
            format!(
                "the token's slot now holds a token labelled {:?}, not {label:?}",
                info.label()
            ),
        )),
        Err(e) => match OpError::ck(e, Function::GetTokenInfo) {
            OpError::Lost { loss, reason } => Err((loss, reason)),
            other => Err((Loss::Device, other.into_backend_error().to_string())),
        },
    }
}

/// Recovery with exponential backoff until it succeeds, the pool stops, or a login is refused.
fn recover(shared: &Shared, session: &mut Option<Session>, generation: &mut u64, loss: Loss) {
    let mut backoff = BACKOFF_MIN;
    // A device loss needs the module re-initialised at once; for a session or login loss first
    // try the cheap way (re-login, reopen), and escalate if that fails.
    let mut reinitialise = loss == Loss::Device;
    let mut attempts = 0u32;
    loop {
        if shared.sleep_unless_stopping(backoff) {
            return;
        }
        attempts += 1;
        match attempt(shared, session, generation, reinitialise) {
            Ok(()) => {
                info!(attempts, reinitialise, "PKCS#11 token recovered");
                return;
            }
            Err(OpError::Fail(e @ BackendError::LoginFailed { .. })) => {
                // The PIN worked at start; retrying a refused PIN would lock the token.
                let reason = format!("{e}; not retrying (the PIN would lock); restart needed");
                error!(%reason, "PKCS#11 recovery gave up");
                let mut state = shared.state();
                state.fatal = true;
                state.health = Health::Recovering { reason };
                shared.changed.notify_all();
                return;
            }
            Err(e) => {
                let reason = e.into_backend_error().to_string();
                warn!(%reason, attempts, "PKCS#11 recovery attempt failed");
                {
                    let mut state = shared.state();
                    if !state.stopping {
                        state.health = Health::Recovering { reason };
                    }
                }
                reinitialise = true;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// One recovery attempt, with every other PKCS#11 call excluded.
fn attempt(
    shared: &Shared,
    session: &mut Option<Session>,
    generation: &mut u64,
    reinitialise: bool,
) -> Result<(), OpError> {
    let mut lib = shared.write_lib();
    if reinitialise || lib.generation != *generation {
        // The module's view of the device is gone: every session dies with C_Finalize. Forget
        // (never close) sessions from before.
        *session = None;
        let _ = lib.ctx.clone().finalize();
        lib.generation += 1;
        *generation = lib.generation;
        initialize(&lib.ctx).map_err(|e| OpError::ck(e, Function::Initialize))?;
    }
    let alive = match session.as_ref() {
        Some(s) => match token::is_logged_in(s) {
            Ok(true) => true,
            Ok(false) => {
                token::login(s, &shared.login.token_label, &shared.login.pin)?;
                token::is_logged_in(s)?
            }
            Err(_) => false,
        },
        None => false,
    };
    if !alive {
        // The session is dead (or never was): forget it, find the token again by label (its
        // slot id may have changed) and log in on a new one.
        *session = None;
        let slot = token::find_token(&lib.ctx, &shared.login.token_label)?;
        *session = Some(open_login_session(&lib.ctx, slot, &shared.login)?);
        lib.slot = slot;
    }
    // Still under the lib write lock, so no worker can use a new session (and report a loss
    // from the new epoch) before the pending report is cleared.
    let mut state = shared.state();
    state.pending = None;
    if !state.stopping {
        state.health = Health::Ready;
    }
    shared.epoch.fetch_add(1, Ordering::AcqRel);
    shared.recoveries.fetch_add(1, Ordering::Relaxed);
    shared.changed.notify_all();
    Ok(())
}
