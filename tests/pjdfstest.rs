//! The POSIX suite pjdfstest through a shifted mount, compared case by case with the same
//! caller on a plain directory of the same filesystem:
//! - host root through a mount `b:0:0:4294967295` vs host root on a plain directory;
//! - root of a user namespace `0 100000 65536` through a mount `b:0:100000:65536` vs the same
//!   namespace root on a plain directory owned by host 100000.
//!
//! Each runs on both backends and through their stack (a kernel idmapped mount with the map on
//! an idmappable FUSE mount of the source).
//!
//! A case that passes on the plain directory must pass through the mount, unless
//! `tests/pjdfstest-exceptions.txt` lists it for that run with a reason.
//! Needs `pjdfstest` (`cargo install pjdfstest --locked`) and a `tests` user and group
//! (`scripts/setup.sh` or `scripts/pjdfstest.sh` provide both).

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

const CONFIG: &str = include_str!("pjdfstest.toml");

const EXCEPTIONS: &str = include_str!("pjdfstest-exceptions.txt");

/// One finished pjdfstest run: the outcome of every case, by name.
#[derive(Debug, Default)]
struct Results {
    cases: BTreeMap<String, String>,
}

impl Results {
    fn parse(stdout: &str) -> Result<Self, String> {
        let mut cases = BTreeMap::new();
        let mut total = None;
        for line in stdout.lines() {
            if let Some(rest) = line.strip_prefix("Summary: ") {
                total = rest
                    .rsplit(", ")
                    .next()
                    .and_then(|t| t.strip_suffix(" total"))
                    .and_then(|n| n.trim().parse::<usize>().ok());
                continue;
            }
            if line.starts_with(char::is_whitespace) {
                continue;
            }
            for outcome in [
                "ok",
                "FAILED",
                "skipped",
                "failed as expected",
                "PASSED UNEXPECTEDLY",
            ] {
                if let Some(name) = line.strip_suffix(outcome)
                    && name.ends_with(' ')
                    && let Some(name) = name.split_whitespace().next()
                {
                    cases.insert(name.to_owned(), outcome.to_owned());
                    break;
                }
            }
        }
        match total {
            None => Err("no `Summary:` line: the run did not finish".into()),
            Some(t) if t != cases.len() => Err(format!(
                "parsed {} cases but the summary says {t}",
                cases.len()
            )),
            Some(_) => Ok(Self { cases }),
        }
    }

    fn count(&self, outcome: &str) -> usize {
        self.cases.values().filter(|o| *o == outcome).count()
    }

    fn summary(&self) -> String {
        format!(
            "{} pass / {} fail / {} skip",
            self.count("ok"),
            self.count("FAILED"),
            self.count("skipped")
        )
    }
}

/// `RUN CASE REASON` lines of the exceptions file that apply to `run` (e.g. `fuse/ns`);
/// `*/ns` applies to both backends.
fn exceptions_for(run: &str) -> BTreeMap<String, String> {
    let (backend, caller) = run.split_once('/').expect("run is BACKEND/CALLER");
    let mut out = BTreeMap::new();
    for (n, line) in EXCEPTIONS.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        let scope = words.next();
        let case = words.next();
        let reason = case.and_then(|c| line.split_once(c)).map(|(_, r)| r);
        let (Some(scope), Some(case), Some(reason)) = (scope, case, reason) else {
            panic!(
                "pjdfstest-exceptions.txt:{}: want `RUN CASE REASON`: {line}",
                n + 1
            );
        };
        let reason = reason.trim();
        assert!(
            !reason.is_empty(),
            "pjdfstest-exceptions.txt:{}: no reason",
            n + 1
        );
        let (b, c) = scope
            .split_once('/')
            .unwrap_or_else(|| panic!("pjdfstest-exceptions.txt:{}: bad run {scope}", n + 1));
        if (b == "*" || b == backend) && (c == "*" || c == caller) {
            out.insert(case.to_owned(), reason.to_owned());
        }
    }
    out
}

fn find_pjdfstest() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PJDFSTEST") {
        return Some(PathBuf::from(p));
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("pjdfstest"))
        .find(|p| p.is_file())
}

fn user_exists(name: &str) -> bool {
    Command::new("getent")
        .args(["passwd", name])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The suite's binary and config, copied where a namespace root can read them.
struct Suite {
    bin: PathBuf,
    config: PathBuf,
}

impl Suite {
    fn prepare(dir: &TestDir) -> Option<Self> {
        let Some(found) = find_pjdfstest() else {
            skip("pjdfstest not installed (cargo install pjdfstest --locked, or scripts/setup.sh)");
            return None;
        };
        if !user_exists("tests") {
            skip("pjdfstest needs a `tests` user and group (scripts/setup.sh creates them)");
            return None;
        }
        let bin = dir.path().join("pjdfstest");
        fs::copy(&found, &bin).expect("copy pjdfstest");
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).expect("chmod");
        let config = dir.path().join("pjdfstest.toml");
        fs::write(&config, CONFIG).expect("write config");
        fs::set_permissions(&config, fs::Permissions::from_mode(0o644)).expect("chmod");
        Some(Self { bin, config })
    }

    /// Runs the suite (or only the cases named in `only`) on `path` with `cmd` wrapping it
    /// (host root or namespace root), from the test dir, outside any mount. The output is kept
    /// in `target/tmp/pjdfstest/WHAT.log`.
    fn run(
        &self,
        mut cmd: Command,
        dir: &TestDir,
        path: &Path,
        what: &str,
        only: &[String],
    ) -> Results {
        cmd.arg(&self.bin)
            .arg("-c")
            .arg(&self.config)
            .arg("-p")
            .arg(path)
            .env("NO_COLOR", "1")
            .current_dir(dir.path());
        if !only.is_empty() {
            // `-e` compares with the full name, before the suite trims it for printing.
            cmd.arg("-e")
                .args(only.iter().map(|c| format!("pjdfstest::tests::{c}")));
        }
        let out = run_timeout(&mut cmd, Duration::from_secs(900));
        let logs = Path::new(env!("CARGO_TARGET_TMPDIR")).join("pjdfstest");
        let _ = fs::create_dir_all(&logs);
        let _ = fs::write(
            logs.join(format!("{}.log", what.replace('/', "-"))),
            &out.stdout,
        );
        Results::parse(&out.stdout).unwrap_or_else(|e| panic!("pjdfstest {what}: {e}\n{out}"))
    }
}

/// The cases that pass on the baseline but not through the mount and are not excepted for
/// `run`; prints the excepted ones and stale exceptions.
fn regressions(run: &str, base: &Results, shifted: &Results) -> Vec<String> {
    let exceptions = exceptions_for(run);
    eprintln!(
        "pjdfstest {run}: baseline {}; through the mount {}",
        base.summary(),
        shifted.summary()
    );
    assert!(
        base.count("ok") >= 300,
        "baseline for {run} passes only {} cases: the setup is broken",
        base.count("ok")
    );
    let mut lost = Vec::new();
    for (case, outcome) in &base.cases {
        if outcome != "ok" {
            continue;
        }
        let now = shifted.cases.get(case).map_or("missing", String::as_str);
        match (now, exceptions.get(case)) {
            ("ok", Some(_)) => eprintln!("  note: excepted case passes now: {case}"),
            ("ok", None) => {}
            (_, Some(reason)) => eprintln!("  excepted: {case}: {now} ({reason})"),
            (_, None) => lost.push(case.clone()),
        }
    }
    lost
}

#[derive(Clone, Copy, PartialEq)]
enum Caller {
    /// Host root, through a mount whose map covers every host id unchanged.
    HostRoot,
    /// Root of a user namespace `0 100000 65536`, through a mount `b:0:100000:65536`.
    NsRoot,
}

/// Baseline on a plain directory, then the suite through a mount, same caller; a timestamp
/// case that fails only through the mount is run once more alone (naps are sensitive to load)
/// and counts if it fails again.
fn suite_vs_baseline(b: Backend, caller: Caller) {
    if !require(b) {
        return;
    }
    let name = if caller == Caller::HostRoot {
        "host"
    } else {
        "ns"
    };
    let dir = TestDir::new(&format!("pjdfstest-{name}"));
    let Some(suite) = Suite::prepare(&dir) else {
        return;
    };
    // Same name length as the mount: pjdfstest's *::enametoolong_path cases fail with "capacity
    // overflow" for some lengths of the base path.
    let plain = dir.dir("plain");
    let src = dir.dir("src");
    let mnt = dir.dir("mount");
    let ns = UserNs::new(NS_MAP);
    let (map, wrap): (&str, Box<dyn Fn() -> Command>) = match caller {
        Caller::HostRoot => (IDENTITY_MAP, Box::new(|| Command::new("env"))),
        Caller::NsRoot => {
            std::os::unix::fs::chown(&plain, Some(100000), Some(100000)).expect("chown");
            (MAP, Box::new(|| ns.cmd_as(0, 0, "env")))
        }
    };
    let run = format!("{b}/{name}");
    let base = suite.run(wrap(), &dir, &plain, &format!("{run}-plain"), &[]);
    // The host-root run mounts with `dev`, as an administrator who wants device nodes would:
    // shiftfs refuses creating them on a `nodev` FUSE mount. A namespace root cannot make
    // real devices either way (only whiteouts, which `nodev` allows).
    let m = ShiftMount::with_args(b, &["--map", map, "-o", "dev"], &src, &mnt);
    let shifted = suite.run(wrap(), &dir, &mnt, &format!("{run}-mount"), &[]);
    let mut lost = regressions(&run, &base, &shifted);
    // Only timestamp cases get a second chance: under load their naps can fall short. Any
    // other case that fails only sometimes is a race worth failing for (open::etxtbsy was).
    let timing: Vec<String> = lost
        .iter()
        .filter(|c| c.contains("time"))
        .cloned()
        .collect();
    if !timing.is_empty() {
        let again = suite.run(wrap(), &dir, &mnt, &format!("{run}-mount-rerun"), &timing);
        lost.retain(|case| {
            let ok = timing.contains(case) && again.cases.get(case).is_some_and(|o| o == "ok");
            if ok {
                eprintln!("  flaky: {case} failed through the mount, then passed alone");
            }
            !ok
        });
    }
    m.unmount();
    assert!(
        lost.is_empty(),
        "pjdfstest {run}: {} case(s) pass on a plain directory but not through the mount \
         (logs in {}/pjdfstest):\n  {}",
        lost.len(),
        env!("CARGO_TARGET_TMPDIR"),
        lost.join("\n  ")
    );
    dir.finish();
}

fn host_root(b: Backend) {
    suite_vs_baseline(b, Caller::HostRoot);
}

fn ns_root(b: Backend) {
    suite_vs_baseline(b, Caller::NsRoot);
}

backend_tests!(host_root, ns_root);
stack_tests!(host_root, ns_root);

#[test]
fn parses_pjdfstest_output() {
    let text = "\
chmod::change_perm::regular                                                   ok
rmdir::ebusy                                                              FAILED
\tmount: permission denied.
unlink::erofs_named                                                      skipped
\tRemounts (allow_remount) are not allowed in the configuration file

Summary: 1 failed, 1 skipped, 1 passed, 0 expected failures, 3 total
";
    let r = Results::parse(text).expect("parse");
    assert_eq!(r.cases["chmod::change_perm::regular"], "ok");
    assert_eq!(r.cases["rmdir::ebusy"], "FAILED");
    assert_eq!(r.cases["unlink::erofs_named"], "skipped");
    assert!(Results::parse(&text.replace("3 total", "4 total")).is_err());
    assert!(
        Results::parse("chmod::x   ok\n").is_err(),
        "an unfinished run is an error"
    );
}

#[test]
fn exceptions_file_is_well_formed() {
    for run in [
        "fuse/host",
        "fuse/ns",
        "kernel/host",
        "kernel/ns",
        "stack/host",
        "stack/ns",
    ] {
        exceptions_for(run);
    }
}
