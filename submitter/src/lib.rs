//! Castellan submitter: relay adapters, fan-out, resubmission, inclusion tracking.
