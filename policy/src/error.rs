//! The crate's error type.

/// Why a policy file, a grant or an operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The file is not valid TOML or does not match the schema (unknown field, bad amount,
    /// unknown unit, wrong type). `at` is the offending line's text.
    #[error("policy line {line}, column {column}: {message} (at `{at}`)")]
    Syntax {
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong.
        message: String,
        /// The text of the line.
        at: String,
    },
    /// The file parses but is contradictory or refers to something undefined.
    #[error("policy line {line}: {field}: {message}")]
    Invalid {
        /// 1-based line of the entry or field at fault.
        line: usize,
        /// The field, as a path such as `tiers."big".threshold`.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A budget grant failed verification.
    #[error("grant rejected: {0}")]
    Grant(String),
}
