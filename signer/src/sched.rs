//! Thread scheduling: the key device's threads first.
//!
//! The device is the signer's bottleneck resource. A PKCS#11 module such as SoftHSM computes
//! each signature on the caller's thread, on the same cores as the signer's bookkeeping (TLS,
//! HTTP, policy, store, verification); a hardware token's worker thread wakes when the device
//! answers and should start the next operation at once. With every thread under the default
//! policy (`SCHED_OTHER`), each wake-up of a bookkeeping thread may preempt the device's thread:
//! under `cargo bench --bench loadgen` at one session, the SoftHSM worker was never idle, yet
//! waited on the run queue for 23% of the time and was preempted ~2,700 times a second (its
//! `/proc/…/schedstat`), so the signer signed at 0.75–0.77 of the device's own rate.
//!
//! With `scheduling.device_first` (the default), `main` puts its own thread under
//! `SCHED_BATCH` before it starts any other thread, so every thread of the process inherits it
//! — except the device's worker threads, which return to `SCHED_OTHER` when they start
//! ([`device_thread`]). `SCHED_BATCH` keeps a thread's nice value and its fair share of CPU; it
//! only stops its wake-ups from preempting a running thread (they wait for the scheduler tick or
//! a free core). Both changes are allowed to an unprivileged process: no capability is needed,
//! and nothing else on the host loses CPU to the signer. Measured the same way, the worker's
//! run-queue wait fell to 2.5% (~140 preemptions a second).

use thread_priority::unix::{
    NormalThreadSchedulePolicy, ThreadSchedulePolicy, set_thread_priority_and_policy,
    thread_native_id, thread_schedule_policy,
};
use thread_priority::{ThreadPriority, ThreadPriorityValue};

/// The scheduling policy of a thread, as far as the signer sets it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// `SCHED_OTHER`: the default; its wake-ups preempt.
    Other,
    /// `SCHED_BATCH`: the same share of CPU, no wake-up preemption.
    Batch,
    /// Anything else (`SCHED_IDLE`, a real-time policy set from outside): left alone.
    Unmanaged,
}

/// Reading or changing the calling thread's scheduling policy failed (the message says which).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SchedError(String);

/// The calling thread's policy.
pub fn current() -> Result<Policy, SchedError> {
    match thread_schedule_policy() {
        Ok(ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Other)) => Ok(Policy::Other),
        Ok(ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Batch)) => Ok(Policy::Batch),
        Ok(_) => Ok(Policy::Unmanaged),
        Err(e) => Err(SchedError(format!(
            "cannot read this thread's scheduling policy: {e:?}"
        ))),
    }
}

/// Puts the calling thread under `SCHED_BATCH`, keeping its nice value; every thread it starts
/// afterwards inherits the policy. Called by `main` before the runtime starts. A thread under
/// another policy than `SCHED_OTHER` (set by an operator, e.g. `chrt`) is left as it is.
pub fn yield_to_devices() -> Result<(), SchedError> {
    if current()? != Policy::Other {
        return Ok(());
    }
    set(NormalThreadSchedulePolicy::Batch, "SCHED_BATCH")
}

/// Called by a key device's worker thread when it starts: back to `SCHED_OTHER` if it inherited
/// `SCHED_BATCH` (see the module docs), so that the device's work preempts the signer's
/// bookkeeping and not the other way round. Does nothing when the process did not yield (tests,
/// benches, `scheduling.device_first = false`). A failure is logged, not fatal: the device then
/// only loses its precedence.
pub fn device_thread() {
    let outcome = match current() {
        Ok(Policy::Batch) => set(NormalThreadSchedulePolicy::Other, "SCHED_OTHER"),
        Ok(_) => Ok(()),
        Err(e) => Err(e),
    };
    if let Err(e) = outcome {
        tracing::warn!(error = %e, "the key device's thread runs without precedence");
    }
}

/// Sets the calling thread's policy to `policy` without changing its nice value.
fn set(policy: NormalThreadSchedulePolicy, name: &'static str) -> Result<(), SchedError> {
    let fail = |reason: String| {
        SchedError(format!(
            "cannot set this thread's scheduling policy to {name}: {reason}"
        ))
    };
    // `thread_priority` sets the nice value together with a normal policy; it takes it as a
    // cross-platform priority, 0 (nice 19) ..= 99 (nice -20). Ask for the thread's own nice
    // value, so that nothing but the policy changes (lowering it would need privileges).
    let nice = rustix::process::getpriority_process(None)
        .map_err(|e| fail(format!("cannot read the nice value: {e}")))?;
    let priority = crossplatform_for_nice(nice)
        .ok_or_else(|| fail(format!("nice value {nice} out of range")))?;
    set_thread_priority_and_policy(
        thread_native_id(),
        ThreadPriority::Crossplatform(priority),
        ThreadSchedulePolicy::Normal(policy),
    )
    .map_err(|e| fail(format!("{e:?}")))?;
    let after = rustix::process::getpriority_process(None)
        .map_err(|e| fail(format!("cannot read the nice value: {e}")))?;
    if after != nice {
        return Err(fail(format!(
            "the nice value changed from {nice} to {after}"
        )));
    }
    Ok(())
}

/// The cross-platform priority that `thread_priority` maps to `nice` under a normal policy: it
/// computes `(39 × (1 − p/99)) as i8 − 20`. Searched rather than inverted, so that the mapping
/// is the crate's own (and [`set`] checks the result).
fn crossplatform_for_nice(nice: i32) -> Option<ThreadPriorityValue> {
    let max = u8::from(ThreadPriorityValue::MAX);
    (u8::from(ThreadPriorityValue::MIN)..=max)
        .find(|&p| {
            let ratio = 1f32 - f32::from(p) / f32::from(max);
            let mapped = i32::from((39f32 * ratio) as i8) - 20;
            mapped == nice
        })
        .and_then(|p| ThreadPriorityValue::try_from(p).ok())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// In a thread of its own (policies and nice values are per thread on Linux).
    fn in_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(f).join().unwrap()
    }

    #[test]
    fn every_nice_value_has_a_priority() {
        for nice in -20..=19 {
            assert!(crossplatform_for_nice(nice).is_some(), "nice {nice}");
        }
        assert!(crossplatform_for_nice(20).is_none());
        assert!(crossplatform_for_nice(-21).is_none());
    }

    #[test]
    fn yielding_keeps_the_nice_value_and_is_inherited_and_a_device_thread_returns() {
        let (mine, child, device, device_nice) = in_thread(|| {
            // Raising one's own nice value needs no privilege; a test run as root must not pass
            // only because root may lower it back.
            rustix::process::setpriority_process(None, 3).unwrap();
            yield_to_devices().unwrap();
            let mine = (
                current().unwrap(),
                rustix::process::getpriority_process(None).unwrap(),
            );
            // A thread started now inherits the policy (and the nice value)...
            let child = in_thread(|| {
                (
                    current().unwrap(),
                    rustix::process::getpriority_process(None).unwrap(),
                )
            });
            // ...and a device thread goes back to SCHED_OTHER, nice unchanged.
            let (device, device_nice) = in_thread(|| {
                device_thread();
                (
                    current().unwrap(),
                    rustix::process::getpriority_process(None).unwrap(),
                )
            });
            (mine, child, device, device_nice)
        });
        assert_eq!(mine, (Policy::Batch, 3));
        assert_eq!(child, (Policy::Batch, 3));
        assert_eq!((device, device_nice), (Policy::Other, 3));
    }

    #[test]
    fn a_device_thread_of_a_process_that_did_not_yield_is_left_alone() {
        let after = in_thread(|| {
            assert_eq!(current().unwrap(), Policy::Other);
            device_thread();
            current().unwrap()
        });
        assert_eq!(after, Policy::Other);
    }
}
