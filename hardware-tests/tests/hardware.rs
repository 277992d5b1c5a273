//! The real-device suite (see the crate documentation and README): one line per case — `ok`,
//! `FAILED`, or `SKIPPED` with the variable to set — and a summary. Exits non-zero when a case
//! failed, or when a device named in `CASTELLAN_HW_REQUIRE` was skipped.
//!
//! `cargo test -p castellan-hardware-tests --test hardware -- [FILTER]` runs the cases whose name
//! contains FILTER; `-- --list` lists them.
#![allow(clippy::print_stderr, clippy::print_stdout, clippy::exit)]

use castellan_hardware_tests::env::Targets;
use castellan_hardware_tests::runner::{Outcome, cases, run_case};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // libtest-style flags cargo may pass (e.g. --nocapture, --test-threads) are accepted and
    // ignored; the first free argument is a name filter.
    let filter = args.iter().find(|a| !a.starts_with('-')).cloned();
    let cases = cases();
    if args.iter().any(|a| a == "--list") {
        for case in &cases {
            println!("{}: test", case.name);
        }
        return;
    }
    let targets = Targets::from_env();
    let selected: Vec<_> = cases
        .iter()
        .filter(|c| filter.as_ref().is_none_or(|f| c.name.contains(f.as_str())))
        .collect();
    println!("\nrunning {} hardware cases", selected.len());
    let (mut passed, mut skipped, mut failed, mut required_skipped) = (0, 0, 0, 0);
    for case in selected {
        match run_case(case, &targets) {
            Outcome::Passed => {
                passed += 1;
                println!("test {} ... ok", case.name);
            }
            Outcome::Skipped(reason) => {
                skipped += 1;
                let required = targets.required.contains(&case.device);
                if required {
                    required_skipped += 1;
                }
                println!(
                    "test {} ... SKIPPED{}: {reason}",
                    case.name,
                    if required {
                        " (REQUIRED: counts as a failure)"
                    } else {
                        ""
                    }
                );
                eprintln!("SKIPPED {}: {reason}", case.name);
            }
            Outcome::Failed(reason) => {
                failed += 1;
                println!("test {} ... FAILED: {reason}", case.name);
            }
        }
    }
    println!(
        "\nhardware suite: {passed} passed; {skipped} SKIPPED (not run, not passed); {failed} failed\n"
    );
    if failed > 0 || required_skipped > 0 {
        std::process::exit(1);
    }
}
