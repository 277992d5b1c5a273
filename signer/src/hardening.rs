//! Process hardening, applied by `main` before the signer reads a PIN or opens a device: no core
//! dumps, not dumpable (no ptrace by other users, `/proc/PID/mem` and friends root-only), memory
//! locked, and no running as root unless the configuration says so.
//!
//! # Security
//! The signer holds no key material (keys stay in the HSM), but it does hold the HSM PIN or auth
//! key, request bodies and approvals. A core file, a swapped-out page or a debugger attached by
//! another process of the same user would expose them. This module closes those three doors:
//! - `setrlimit(RLIMIT_CORE, 0)` and `prctl(PR_SET_DUMPABLE, 0)`: no core file is written, and
//!   only root can ptrace the process or read its memory through `/proc`;
//! - `mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)` (unless `hardening.no_mlock`): no page
//!   the process has touched is swapped out;
//!   it needs `RLIMIT_MEMLOCK` raised (systemd: `LimitMEMLOCK=`) or `CAP_IPC_LOCK`, and a failure
//!   stops the signer instead of running unlocked;
//! - running with effective uid 0 is refused unless `hardening.allow_root`: a root signer's bug
//!   is the whole machine's.
//!
//! Every step fails closed: if the kernel refuses one, the signer does not start.

use crate::config::HardeningConfig;

/// A hardening step the kernel refused, or a configuration the signer refuses to run with.
#[derive(Debug, thiserror::Error)]
pub enum HardeningError {
    /// Running as root without `hardening.allow_root`.
    #[error(
        "refusing to run as root (effective uid 0): run the signer as a dedicated user, or set \
         `allow_root = true` in the [hardening] section of the configuration"
    )]
    Root,
    /// `setrlimit(RLIMIT_CORE, 0)` failed.
    #[error("cannot disable core dumps (setrlimit RLIMIT_CORE 0): {0}")]
    CoreLimit(std::io::Error),
    /// `prctl(PR_SET_DUMPABLE, 0)` failed.
    #[error("cannot make the process non-dumpable (prctl PR_SET_DUMPABLE 0): {0}")]
    Dumpable(std::io::Error),
    /// `mlockall` failed, typically because `RLIMIT_MEMLOCK` is too low.
    #[error(
        "cannot lock memory (mlockall MCL_CURRENT|MCL_FUTURE|MCL_ONFAULT): {error}; the memory-lock limit is \
         {limit}: raise it (systemd: LimitMEMLOCK=infinity) or set `no_mlock = true` in [hardening]"
    )]
    Mlock {
        /// What the kernel said.
        error: std::io::Error,
        /// `RLIMIT_MEMLOCK` at the time, for the message.
        limit: String,
    },
}

/// What [`apply`] did, for the start-up log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Applied {
    /// Memory is locked (`mlockall`).
    pub memory_locked: bool,
    /// Running as root (allowed by the configuration).
    pub as_root: bool,
}

/// Disables core dumps and makes the process non-dumpable. Called before anything else, before
/// the configuration is even read, so no later step can leave a core file behind.
///
/// # Security
/// After this returns `Ok`, a crash writes no core file and no process other than root's can
/// ptrace the signer or read its memory through `/proc/PID/mem`.
pub fn disable_core_dumps() -> Result<(), HardeningError> {
    use rustix::process::{DumpableBehavior, Resource, Rlimit, set_dumpable_behavior, setrlimit};
    setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )
    .map_err(|e| HardeningError::CoreLimit(e.into()))?;
    set_dumpable_behavior(DumpableBehavior::NotDumpable)
        .map_err(|e| HardeningError::Dumpable(e.into()))
}

/// Applies the configured hardening: refuses root unless allowed, disables core dumps (again:
/// idempotent) and locks memory unless `no_mlock`.
///
/// # Security
/// Fails closed: every refused step is an error and the signer must not start.
pub fn apply(config: &HardeningConfig) -> Result<Applied, HardeningError> {
    let as_root = rustix::process::geteuid().is_root();
    if as_root && !config.allow_root {
        return Err(HardeningError::Root);
    }
    disable_core_dumps()?;
    let memory_locked = if config.no_mlock {
        false
    } else {
        use rustix::mm::{MlockAllFlags, mlockall};
        // ONFAULT: lock pages as they are touched instead of populating every mapping up front.
        // Every page that can hold a secret is touched before it holds one, so it is locked just
        // the same; without ONFAULT each new thread stack and allocator arena would become
        // resident in full (a blocking-pool thread costs its whole 2 MiB stack).
        mlockall(MlockAllFlags::CURRENT | MlockAllFlags::FUTURE | MlockAllFlags::ONFAULT).map_err(
            |e| HardeningError::Mlock {
                error: e.into(),
                limit: memlock_limit(),
            },
        )?;
        true
    };
    Ok(Applied {
        memory_locked,
        as_root,
    })
}

fn memlock_limit() -> String {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Memlock);
    let show = |v: Option<u64>| v.map_or_else(|| "unlimited".to_owned(), |b| format!("{b} bytes"));
    format!("{} (hard {})", show(limit.current), show(limit.maximum))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn root_is_refused_unless_allowed() {
        let as_root = rustix::process::geteuid().is_root();
        let refused = HardeningConfig {
            allow_root: false,
            no_mlock: true,
        };
        // Only the root check runs before anything changes the test process when it is refused.
        if as_root {
            let err = apply(&refused).unwrap_err();
            assert!(matches!(err, HardeningError::Root), "{err}");
            assert!(err.to_string().contains("allow_root = true"), "{err}");
        } else {
            // Not root: the check passes; core dumps go off in this test process, which is fine.
            assert!(!apply(&refused).unwrap().as_root);
        }
    }

    #[test]
    fn the_mlock_error_names_the_limit_and_the_way_out() {
        let err = HardeningError::Mlock {
            error: std::io::Error::from_raw_os_error(12),
            limit: memlock_limit(),
        };
        let text = err.to_string();
        assert!(text.contains("LimitMEMLOCK"), "{text}");
        assert!(text.contains("no_mlock = true"), "{text}");
        assert!(!text.contains('\n'), "one line: {text}");
    }
}
