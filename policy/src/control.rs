//! Freeze, pause and breaker: the state lives in the store; the policy supplies pure transitions.

use crate::decision::{Code, Decision};
use crate::policy::Policy;
use crate::types::KeyName;

/// A key's pause and breaker state, as kept by the store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeyControl {
    /// Set by an operator pause (unix seconds of the pause); the key signs nothing while set.
    pub paused_since: Option<u64>,
    /// Consecutive failed outcomes reported since the last success (or the last trip).
    pub consecutive_failures: u32,
    /// The breaker is open (the key signs nothing) while `now` is before this.
    pub breaker_open_until: u64,
}

/// What happened to a signed transaction or bundle, as reported by the submitter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxOutcome {
    /// Included and succeeded.
    Included,
    /// Included but reverted.
    Reverted,
    /// Never included (target blocks passed, or dropped).
    NotIncluded,
}

impl Policy {
    /// The breaker transition: a success resets the failure count; a failure (reverted, not
    /// included) increments it, and the `failures`-th consecutive one opens the breaker for
    /// `cooldown` and starts counting afresh. Keys without a `breaker` rule only count.
    pub fn breaker_on_outcome(
        &self,
        key: &KeyName,
        state: KeyControl,
        outcome: TxOutcome,
        now: u64,
    ) -> KeyControl {
        match outcome {
            TxOutcome::Included => KeyControl {
                consecutive_failures: 0,
                ..state
            },
            TxOutcome::Reverted | TxOutcome::NotIncluded => {
                let failures = state.consecutive_failures.saturating_add(1);
                match self.keys.get(key).and_then(|k| k.breaker.as_ref()) {
                    Some(b) if failures >= b.failures => KeyControl {
                        consecutive_failures: 0,
                        breaker_open_until: now
                            .saturating_add(b.cooldown)
                            .max(state.breaker_open_until),
                        ..state
                    },
                    _ => KeyControl {
                        consecutive_failures: failures,
                        ..state
                    },
                }
            }
        }
    }

    /// Pauses a key at `now` (an already paused key keeps its original pause time, so pausing
    /// again does not extend or shorten the cooldown).
    pub fn pause_key(&self, state: KeyControl, now: u64) -> KeyControl {
        KeyControl {
            paused_since: Some(state.paused_since.unwrap_or(now)),
            ..state
        }
    }

    /// Resumes a paused key, refused until the key's `pause_cooldown` has passed since the pause
    /// (so a pause cannot be flipped off in a hurry).
    ///
    /// # Errors
    /// A `key_paused` decision saying when the resume becomes possible.
    #[allow(clippy::result_large_err)] // a refusal is a whole decision, as from `evaluate`
    pub fn resume_key(
        &self,
        key: &KeyName,
        state: KeyControl,
        now: u64,
    ) -> Result<KeyControl, Decision> {
        let Some(since) = state.paused_since else {
            return Ok(state);
        };
        let cooldown = self.keys.get(key).map_or(0, |k| k.pause_cooldown);
        let at = since.saturating_add(cooldown);
        if now < at {
            return Err(Decision::deny(
                Code::KeyPaused,
                format!(
                    "key `{key}` paused at {since} cannot resume before {at} (rule keys.{}.pause_cooldown)",
                    crate::config::quote(key.as_str())
                ),
            ));
        }
        Ok(KeyControl {
            paused_since: None,
            ..state
        })
    }
}
