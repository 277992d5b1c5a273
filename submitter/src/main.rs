//! The `submitter` binary.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("submitter is not built yet (issue 5)")
}
