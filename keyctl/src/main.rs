//! The `keyctl` binary.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("keyctl is not built yet (issue 6)")
}
