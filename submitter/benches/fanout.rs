//! Placeholder created by the lead so the workspace manifest parses; the submitter engineer replaces it.
fn main() {}
