//! The `signer` daemon.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("the signer daemon is not built yet (issue 4)")
}
