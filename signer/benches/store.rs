//! Decision transactions per second through [`SqliteStore`] on a real file (fsync on every
//! commit), with 1 and with 8 concurrent callers. Group commit lets the 8 callers share each
//! fsync, so their combined rate should be several times the single caller's fsync-bound rate.
//! 64 callers show where the writer thread becomes CPU-bound.
//!
//! Each decision is what the signing pipeline commits: freeze, key status and pause checks, a
//! request-id check, three check-and-reserve windows (1 min request count, 1 h value, 24 h cost)
//! and the audit record.
//!
//! `writer_cpu` measures the store's own cost per signing request: the CPU time of the writer
//! threads (`store-writer` and `store-sync`, read from `/proc/self/task/<tid>/schedstat`, nanoseconds) per
//! decision with five windows plus its queued outcome (as the signing pipeline records it), with 1
//! and with 8 callers. Run it alone
//! with `cargo bench -p castellan-signer --bench store -- writer_cpu`; set `STORE_BENCH_CPU_ONLY=1`
//! to skip the throughput groups (e.g. under `valgrind --tool=callgrind`) and
//! `STORE_BENCH_REQUESTS` to change the number of requests (default 4000).

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use alloy::primitives::{Address, U256, keccak256};
use castellan_signer::audit::UnixMillis;
use castellan_signer::backend::KeyRef;
use castellan_signer::store::{
    Change, DecisionTx, KeyName, KeyVersion, NewKeyVersion, Outcome, OutcomeTx, RequestId,
    Reservation, SqliteStore, Store, WindowKey,
};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use k256::ecdsa::SigningKey;
use serde_json::json;

fn decision(n: u64, key: &KeyVersion) -> DecisionTx {
    let window = |name: &str, duration_ms: u64, amount: u64| Reservation {
        window: WindowKey::new(format!("key:bench:{name}")).expect("window"),
        duration_ms,
        amount: U256::from(amount),
        limit: U256::MAX,
    };
    let id = format!("bench-{n}");
    DecisionTx {
        request_id: RequestId::new(id.clone()).expect("id"),
        key: key.clone(),
        identity: "spiffe://castellan/strategy-bench".into(),
        at: UnixMillis::now(),
        digest: keccak256(id.as_bytes()),
        allow_retiring: false,
        reservations: vec![
            window("requests:60", 60_000, 1),
            window("value:3600", 3_600_000, 1_000_000_000_000_000),
            window("cost:86400", 86_400_000, 1_500_000_000_000_000),
        ],
        details: json!({"decision": "allow", "policy_hash": "0x00", "to": "0x00", "value": "1"}),
    }
}

/// Five windows, as a request under a typical policy reserves: two rate limits and three
/// velocity limits.
fn decision5(n: u64, key: &KeyVersion) -> DecisionTx {
    let mut d = decision(n, key);
    let window = |name: &str, duration_ms: u64, amount: u64| Reservation {
        window: WindowKey::new(format!("key:bench:{name}")).expect("window"),
        duration_ms,
        amount: U256::from(amount),
        limit: U256::MAX,
    };
    d.reservations.push(window("requests:1", 1_000, 1));
    d.reservations
        .push(window("value:86400", 86_400_000, 1_000_000_000_000_000));
    d
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime")
}

fn bench_decisions(c: &mut Criterion) {
    if std::env::var_os("STORE_BENCH_CPU_ONLY").is_some() {
        return;
    }
    let rt = runtime();
    // On the build's target disk (not a tmpfs), so commits really fsync.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let store = Arc::new(SqliteStore::open(dir.path().join("bench.db")).expect("open"));
    let key = rt.block_on(setup_key(&store));
    let counter = Arc::new(AtomicU64::new(0));
    let mut group = c.benchmark_group("store_decision");
    group.throughput(Throughput::Elements(1));
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(2));
    group.measurement_time(Duration::from_secs(10));
    for callers in [1u64, 8, 64] {
        let before = store.commit_stats();
        group.bench_function(format!("{callers}_callers"), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    let mut tasks = Vec::new();
                    for t in 0..callers {
                        let n = iters / callers + u64::from(t < iters % callers);
                        let store = Arc::clone(&store);
                        let key = key.clone();
                        let counter = Arc::clone(&counter);
                        tasks.push(tokio::spawn(async move {
                            for _ in 0..n {
                                let id = counter.fetch_add(1, Ordering::Relaxed);
                                store
                                    .commit_decision(decision(id, &key))
                                    .await
                                    .expect("decision");
                            }
                        }));
                    }
                    for t in tasks {
                        t.await.expect("task");
                    }
                    start.elapsed()
                })
            });
        });
        let after = store.commit_stats();
        let (jobs, commits) = (after.jobs - before.jobs, after.commits - before.commits);
        eprintln!(
            "{callers} callers: {jobs} decisions in {commits} commits ({:.1} per fsync)",
            jobs as f64 / commits.max(1) as f64
        );
    }
    group.finish();
}

async fn setup_key(store: &SqliteStore) -> KeyVersion {
    let vk = *SigningKey::from_bytes((&[9u8; 32]).into())
        .expect("scalar")
        .verifying_key();
    let rec = store
        .register_key_version(
            NewKeyVersion {
                name: KeyName::new("bench").expect("name"),
                key_ref: KeyRef::Pkcs11 {
                    label: "bench".into(),
                    id: "01".into(),
                },
                address: Address::from_public_key(&vk),
                public_key: vk.to_encoded_point(true).as_bytes().to_vec(),
                rotate_every_ms: None,
            },
            Change::new("bench", UnixMillis::now()),
        )
        .await
        .expect("register");
    store
        .activate_version(rec.version, None, Change::new("bench", UnixMillis::now()))
        .await
        .expect("activate")
        .version
}

/// CPU the store's writer thread has used so far: total nanoseconds (schedstat), and user and
/// system clock ticks (stat), to tell the store's own work from the kernel's fsync work.
fn writer_cpu() -> (u64, u64, u64) {
    let tasks = std::fs::read_dir("/proc/self/task").expect("/proc/self/task");
    let (mut ns, mut utime, mut stime) = (0u64, 0u64, 0u64);
    let mut found = 0;
    for task in tasks {
        let path = task.expect("task").path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if !matches!(comm.trim_end(), "store-writer" | "store-sync") {
            continue;
        }
        found += 1;
        let schedstat = std::fs::read_to_string(path.join("schedstat")).expect("schedstat");
        ns += schedstat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .expect("schedstat format");
        let stat = std::fs::read_to_string(path.join("stat")).expect("stat");
        // Fields after the command name (which ends at the last ')'): utime is the 12th, stime
        // the 13th.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .expect("stat format")
            .1
            .split_whitespace()
            .collect();
        utime += fields[11].parse::<u64>().expect("utime");
        stime += fields[12].parse::<u64>().expect("stime");
    }
    assert_eq!(found, 2, "expected the store's writer and sync threads");
    (ns, utime, stime)
}

/// Writer-thread CPU per signing request (decision with five windows + signed outcome).
fn writer_cpu_per_request(_c: &mut Criterion) {
    let requests: u64 = std::env::var("STORE_BENCH_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4000);
    for history in [false, true] {
        writer_cpu_run(requests, history);
    }
}

/// One database, fresh or (`history`) holding a day of history: a request every 20 seconds for
/// the past 24 hours, so that the 1 h and 24 h windows span 180 and 1440 one-minute buckets, as
/// in steady operation.
fn writer_cpu_run(requests: u64, history: bool) {
    let rt = runtime();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let store = Arc::new(SqliteStore::open(dir.path().join("cpu.db")).expect("open"));
    let key = rt.block_on(setup_key(&store));
    let counter = Arc::new(AtomicU64::new(0));
    let label = if history { "day of history" } else { "fresh" };
    if history {
        let now = UnixMillis::now().0;
        let day = 86_400_000u64;
        rt.block_on(async {
            let mut tasks = Vec::new();
            for t in 0..16u64 {
                let store = Arc::clone(&store);
                let key = key.clone();
                tasks.push(tokio::spawn(async move {
                    let mut i = t;
                    while i * 20_000 < day {
                        let mut d = decision5(u64::MAX - i, &key);
                        d.at = UnixMillis(now - day + i * 20_000);
                        store.commit_decision(d).await.expect("history");
                        i += 16;
                    }
                }));
            }
            for t in tasks {
                t.await.expect("task");
            }
        });
    }
    for callers in [1u64, 8] {
        let run = |n_total: u64| {
            rt.block_on(async {
                let start = Instant::now();
                let mut tasks = Vec::new();
                for t in 0..callers {
                    let n = n_total / callers + u64::from(t < n_total % callers);
                    let store = Arc::clone(&store);
                    let key = key.clone();
                    let counter = Arc::clone(&counter);
                    tasks.push(tokio::spawn(async move {
                        for _ in 0..n {
                            let id = counter.fetch_add(1, Ordering::Relaxed);
                            let d = decision5(id, &key);
                            let request_id = d.request_id.clone();
                            store.commit_decision(d).await.expect("decision");
                            store
                                .queue_outcome(OutcomeTx {
                                    request_id,
                                    at: UnixMillis::now(),
                                    outcome: Outcome::Signed {
                                        details: json!({
                                            "signature": format!("0x{}", "ab".repeat(65)),
                                            "tx_hash": format!("0x{}", "cd".repeat(32)),
                                        }),
                                    },
                                })
                                .await
                                .expect("outcome");
                        }
                    }));
                }
                for t in tasks {
                    t.await.expect("task");
                }
                start.elapsed()
            })
        };
        // Warm up: statement caches, the page cache, window state.
        run((requests / 10).max(callers));
        let (cpu_before, user_before, sys_before) = writer_cpu();
        let stats_before = store.commit_stats();
        let elapsed = run(requests);
        let (cpu_after, user_after, sys_after) = writer_cpu();
        let cpu = cpu_after - cpu_before;
        // Clock ticks are 10 ms on Linux (USER_HZ = 100).
        let tick_us = |ticks: u64| ticks as f64 * 10_000.0 / requests as f64;
        let stats = store.commit_stats();
        let commits = stats.commits - stats_before.commits;
        eprintln!(
            "writer_cpu {label}, {callers} callers: {:.1} us writer CPU per request (decision with 5 \
             windows + queued outcome; user {:.1} us, system {:.1} us), {:.0} requests/s, {:.1} \
             jobs per commit, {:.2} fsyncs per request",
            cpu as f64 / 1e3 / requests as f64,
            tick_us(user_after - user_before),
            tick_us(sys_after - sys_before),
            requests as f64 / elapsed.as_secs_f64(),
            (stats.jobs - stats_before.jobs) as f64 / commits.max(1) as f64,
            (stats.syncs - stats_before.syncs) as f64 / requests as f64,
        );
    }
}

criterion_group!(benches, writer_cpu_per_request, bench_decisions);
criterion_main!(benches);
