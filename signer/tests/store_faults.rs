//! Store faults against the real signer binary. Disk full: its SQLite store lives on a small
//! tmpfs mounted for the test, and the filesystem is filled. While the store cannot commit, the
//! signer refuses to sign (fails closed) with 503 `store_unavailable`; every signature it did
//! answer has its durable decision record; and it signs again by itself once space is freed —
//! no restart.
//!
//! Read-only storage: the store lives on an ext4 filesystem on a loop device, and the loop
//! device's backing image is made immutable (`chattr +i`) under the running signer, so every
//! write the filesystem sends to its disk fails (EIO at the block layer, fsync fails), and
//! `chattr -i` makes the disk writable again. Other ways do not work here: Linux refuses to
//! remount a filesystem read-only while a process holds files open for writing on it (`mount
//! point is busy`); `blockdev --setro` on the loop device only logs a warning and writes still
//! go through; device-mapper (`error` target) and block-layer fault injection are not in this
//! kernel. The ext4 filesystem has no journal and `errors=continue`: a journal that fails a
//! write aborts and turns the filesystem read-only until it is remounted, which no signer can
//! recover from by itself.
//!
//! Needs root (or CAP_SYS_ADMIN) to mount and `losetup`, `mkfs.ext4`, `chattr` (e2fsprogs,
//! installed by scripts/tools.sh); the tests fail with a message saying so otherwise. Mounts
//! and loop devices are removed when a test ends, also when it fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use alloy::primitives::Address;
use castellan_tests::softhsm::in_own_process;
use serde_json::Value;
use support::{Appliance, policy_toml, runtime};

/// A tmpfs mounted for the test; unmounted on drop (also when the test panics).
struct Tmpfs {
    at: PathBuf,
}

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Self {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .arg("castellan-store-faults")
            .arg(at)
            .output()
            .unwrap_or_else(|e| panic!("cannot run mount: {e}"));
        assert!(
            out.status.success(),
            "this test needs to mount a tmpfs (run it as root or with CAP_SYS_ADMIN): mount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { at: at.to_owned() }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: succeeds even while the (killed) signer's files are still being closed.
        let _ = Command::new("umount").arg("-l").arg(&self.at).status();
    }
}

/// Fills the filesystem holding `dir` with one file until it is full; returns its path.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0x5a_u8; 64 * 1024];
    let mut written = 0usize;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n,
            Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
            Err(e) => panic!("filling the store's filesystem: {e}"),
        }
        assert!(written < 1 << 30, "the filesystem does not fill up");
    }
    // The last partial pages too.
    for _ in 0..64 {
        if f.write(&[0x5a; 512]).is_err() {
            break;
        }
    }
    let _ = f.sync_all();
    path
}

struct Answer {
    status: u16,
    code: Option<String>,
    message: Option<String>,
    retry_after: Option<String>,
    request_id: String,
}

async fn sign(app: &Appliance, c: &reqwest::Client, n: u64) -> Answer {
    let request_id = format!("store-fault-{n}");
    let r = c
        .post(app.url("/v1/keys/hot/sign/transaction"))
        .header("x-request-id", &request_id)
        .json(&support::transfer(n))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let retry_after = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let body: Value = r.json().await.unwrap_or(Value::Null);
    Answer {
        status,
        code: body["error"]["code"].as_str().map(str::to_owned),
        message: body["error"]["message"].as_str().map(str::to_owned),
        retry_after,
        request_id,
    }
}

/// `/ready`: the status and the error code, if any.
async fn ready(app: &Appliance, c: &reqwest::Client) -> (u16, Option<String>) {
    let r = c.get(app.url("/ready")).send().await.unwrap();
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    (status, body["error"]["code"].as_str().map(str::to_owned))
}

fn assert_store_refusal(a: &Answer) {
    assert_eq!(a.status, 503, "{:?} {:?}", a.code, a.message);
    assert_eq!(
        a.code.as_deref(),
        Some("store_unavailable"),
        "{:?}",
        a.message
    );
    assert!(a.retry_after.is_some(), "no Retry-After");
    let m = a.message.as_deref().unwrap();
    assert!(m.contains("nothing was signed"), "{m}");
}

#[test]
fn disk_full_store_fails_closed_and_recovers() {
    in_own_process(
        "disk_full_store_fails_closed_and_recovers",
        "storefaults",
        |token| {
            runtime().block_on(async {
                let policy = policy_toml(&[0x41, 0x42, 0x43].map(Address::repeat_byte));
                let mut app = Appliance::start(token, &["hot"], &policy).await;
                // Move the store onto a 4 MiB tmpfs and restart the signer on it.
                app.kill();
                let fs = Tmpfs::mount(&app.path("storefs"), "4m");
                move_store(&mut app, &fs.at);
                let pid = app.pid().unwrap();
                let c = app.client(Some("alpha"));
                let mut n = 0u64;
                let mut signed = Vec::new();
                for _ in 0..5 {
                    n += 1;
                    let a = sign(&app, &c, n).await;
                    assert_eq!(a.status, 200, "{:?}", a.message);
                    signed.push(a.request_id);
                }

                // 1. Disk full: sign until the store cannot commit (bounded), then every further
                //    request is refused until space is freed.
                let filler = fill(&fs.at);
                let mut first_refusal = None;
                for _ in 0..400 {
                    n += 1;
                    let a = sign(&app, &c, n).await;
                    match a.status {
                        200 => signed.push(a.request_id),
                        _ => {
                            assert_store_refusal(&a);
                            first_refusal = Some(n);
                            break;
                        }
                    }
                }
                let first_refusal =
                    first_refusal.expect("400 signatures on a full filesystem and no refusal");
                println!(
                    "disk full: {} signed before the first refusal (WAL space), refused at #{first_refusal}",
                    signed.len() - 5
                );
                // While the disk stays full, every request is refused, and /ready says so (as
                // for an unavailable HSM). A commit can still fit now and then in WAL space
                // that SQLite reuses once a checkpoint has caught up (fewer pages than the
                // failed one): such a signature is durably recorded (the audit check below
                // covers it), so it counts as signed, and the run goes on until ten refusals
                // in a row with /ready false after them.
                let mut in_a_row = 0;
                let mut fitted = 0;
                let mut attempts = 0;
                loop {
                    attempts += 1;
                    assert!(attempts < 400, "the full store never refused ten times in a row");
                    n += 1;
                    let a = sign(&app, &c, n).await;
                    if a.status == 200 {
                        signed.push(a.request_id);
                        fitted += 1;
                        in_a_row = 0;
                        continue;
                    }
                    assert_store_refusal(&a);
                    in_a_row += 1;
                    if in_a_row < 10 {
                        continue;
                    }
                    let (status, code) = ready(&app, &c).await;
                    if status == 200 {
                        // Its write probe found room: the store can write, so it is ready.
                        in_a_row = 0;
                        continue;
                    }
                    assert_eq!(status, 503, "/ready while the disk is full");
                    assert_eq!(code.as_deref(), Some("not_ready"));
                    break;
                }
                println!("disk full: {fitted} signed in reused WAL space after the first refusal");
                // Space comes back: /ready turns true by itself (its write probe), before any
                // signing request, and the signer signs again.
                std::fs::remove_file(&filler).unwrap();
                let freed = Instant::now();
                let ready_again = loop {
                    let (status, code) = ready(&app, &c).await;
                    if status == 200 {
                        break freed.elapsed();
                    }
                    assert_eq!(code.as_deref(), Some("not_ready"));
                    assert!(
                        freed.elapsed() < Duration::from_secs(10),
                        "/ready still false 10 s after space was freed, with no signing request"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                };
                println!("disk full: /ready true {} ms after space was freed", ready_again.as_millis());
                let recovered = loop {
                    n += 1;
                    let a = sign(&app, &c, n).await;
                    if a.status == 200 {
                        signed.push(a.request_id);
                        break freed.elapsed();
                    }
                    assert_store_refusal(&a);
                    assert!(freed.elapsed() < Duration::from_secs(10), "no recovery after freeing space");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                };
                println!("disk full: signing again {} ms after space was freed", recovered.as_millis());

                for _ in 0..5 {
                    n += 1;
                    let a = sign(&app, &c, n).await;
                    assert_eq!(a.status, 200, "{:?}", a.message);
                    signed.push(a.request_id);
                }

                // No restart, and every signature answered has its decision in the audit chain.
                assert_eq!(app.pid(), Some(pid));
                let records = app.audit().await;
                for rid in &signed {
                    assert!(
                        records.iter().any(|r| r.kind.as_str() == "decision"
                            && r.request_id.as_deref() == Some(rid.as_str())),
                        "signature {rid} has no decision record"
                    );
                }
                println!("{} signatures, each with its decision record", signed.len());
                app.kill();
            });
        },
    );
}

/// Runs a command that the read-only test needs; panics naming the command when it is missing
/// or fails.
fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| {
        panic!("this test needs `{cmd}` (util-linux / e2fsprogs, see scripts/tools.sh): {e}")
    });
    assert!(
        out.status.success(),
        "`{cmd} {}` failed (this test needs root or CAP_SYS_ADMIN): {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// An ext4 filesystem (no journal, `errors=continue`) in an image file on a loop device,
/// mounted for the test. Drop makes the image writable again, unmounts and detaches the loop
/// device (also when the test panics).
struct LoopFs {
    image: PathBuf,
    device: Option<String>,
    at: Option<PathBuf>,
}

impl LoopFs {
    fn mount(image: &Path, at: &Path, size: u64) -> Self {
        let mut fs = Self {
            image: image.to_owned(),
            device: None,
            at: None,
        };
        std::fs::File::create(image).unwrap().set_len(size).unwrap();
        let img = image.to_str().unwrap();
        run("mkfs.ext4", &["-q", "-F", "-O", "^has_journal", img]);
        fs.device = Some(run("losetup", &["--find", "--show", img]));
        std::fs::create_dir_all(at).unwrap();
        let dev = fs.device.clone().unwrap();
        run(
            "mount",
            &["-o", "errors=continue", &dev, at.to_str().unwrap()],
        );
        fs.at = Some(at.to_owned());
        std::fs::set_permissions(at, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        fs
    }

    fn at(&self) -> &Path {
        self.at.as_deref().unwrap()
    }

    /// The disk refuses (`true`) or accepts (`false`) every write.
    fn refuse_writes(&self, refuse: bool) {
        run(
            "chattr",
            &[
                if refuse { "+i" } else { "-i" },
                self.image.to_str().unwrap(),
            ],
        );
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.image).status();
        if let Some(at) = &self.at {
            // Lazy: succeeds even while the (killed) signer's files are still being closed.
            let _ = Command::new("umount").arg("-l").arg(at).status();
        }
        if let Some(dev) = &self.device {
            // Detaches now, or (autoclear) once the lazily unmounted filesystem lets go of it.
            let _ = Command::new("losetup").arg("-d").arg(dev).status();
        }
    }
}

/// Copies the (stopped) signer's store into `dir` and starts it again with the store there.
fn move_store(app: &mut Appliance, dir: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let from = app.path(&format!("signer.db{suffix}"));
        if from.exists() {
            std::fs::copy(&from, dir.join(format!("signer.db{suffix}"))).unwrap();
        }
    }
    let config_path = app.path("signer.toml");
    let config = std::fs::read_to_string(&config_path).unwrap();
    let old = format!("path = \"{}\"", app.path("signer.db").display());
    assert!(config.contains(&old), "{config}");
    let new = format!("path = \"{}\"", dir.join("signer.db").display());
    std::fs::write(&config_path, config.replace(&old, &new)).unwrap();
    app.spawn();
}

#[test]
fn read_only_store_fails_closed_and_recovers() {
    in_own_process(
        "read_only_store_fails_closed_and_recovers",
        "storero",
        |token| {
            runtime().block_on(async {
                let policy = policy_toml(&[0x41, 0x42, 0x43].map(Address::repeat_byte));
                let mut app = Appliance::start(token, &["hot"], &policy).await;
                app.kill();
                let fs = LoopFs::mount(&app.path("store.img"), &app.path("storefs"), 32 << 20);
                move_store(&mut app, fs.at());
                let pid = app.pid().unwrap();
                let c = app.client(Some("alpha"));
                let mut n = 0u64;
                let mut signed = Vec::new();
                for _ in 0..5 {
                    n += 1;
                    let a = sign(&app, &c, n).await;
                    assert_eq!(a.status, 200, "{:?}", a.message);
                    signed.push(a.request_id);
                }

                // 1. The disk refuses writes: the first decision's fsync fails, so the first
                //    request is refused, and every further one until the disk takes writes.
                fs.refuse_writes(true);
                for i in 0..10 {
                    n += 1;
                    let a = sign(&app, &c, n).await;
                    assert_store_refusal(&a);
                    if i == 0 {
                        println!("read-only disk: refused with {:?}", a.message.unwrap());
                    }
                }
                // 2. Writable again: the signer signs again by itself.
                fs.refuse_writes(false);
                let restored = Instant::now();
                let mut refused_after = 0;
                let recovered = loop {
                    n += 1;
                    let a = sign(&app, &c, n).await;
                    if a.status == 200 {
                        signed.push(a.request_id);
                        break restored.elapsed();
                    }
                    assert_store_refusal(&a);
                    refused_after += 1;
                    assert!(
                        restored.elapsed() < Duration::from_secs(10),
                        "no recovery 10 s after the disk took writes again"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                };
                println!(
                    "read-only disk: signing again {} ms after the disk took writes \
                     ({refused_after} refused meanwhile)",
                    recovered.as_millis()
                );
                // The failure was seen where the store makes commits durable (the sync thread's
                // fdatasync of the WAL), and writes resumed only through the recovery
                // checkpoint that puts every earlier commit on disk.
                let log = app.stderr();
                assert!(
                    log.contains("fsync of the store's WAL failed"),
                    "the fault never reached the WAL sync:\n{log}"
                );
                assert!(
                    log.contains("store recovered from a failed fsync"),
                    "writes resumed without the recovery checkpoint:\n{log}"
                );
                for _ in 0..5 {
                    n += 1;
                    let a = sign(&app, &c, n).await;
                    assert_eq!(a.status, 200, "{:?}", a.message);
                    signed.push(a.request_id);
                }

                // A second fault on the same, running signer is refused the same way.
                fs.refuse_writes(true);
                n += 1;
                assert_store_refusal(&sign(&app, &c, n).await);
                fs.refuse_writes(false);

                // No restart, and every signature answered has its decision in the audit chain.
                assert_eq!(app.pid(), Some(pid));
                let records = app.audit().await;
                for rid in &signed {
                    assert!(
                        records.iter().any(|r| r.kind.as_str() == "decision"
                            && r.request_id.as_deref() == Some(rid.as_str())),
                        "signature {rid} has no decision record"
                    );
                }
                println!(
                    "{} signatures, each with its decision record ({} audit records)",
                    signed.len(),
                    records.len()
                );

                // The store written across the faults opens again after a restart on the same
                // disk, with every decision still there, and the signer signs on it.
                app.kill();
                app.spawn();
                n += 1;
                let a = sign(&app, &c, n).await;
                assert_eq!(a.status, 200, "after the restart: {:?}", a.message);
                signed.push(a.request_id);
                let records = app.audit().await;
                for rid in &signed {
                    assert!(
                        records.iter().any(|r| r.kind.as_str() == "decision"
                            && r.request_id.as_deref() == Some(rid.as_str())),
                        "after the restart, signature {rid} has no decision record"
                    );
                }
                app.kill();
            });
        },
    );
}
