//! The one rule for missing test prerequisites, shared by every test crate: skip with a
//! reason on a developer's machine, fail under `CI=true`.

/// True when the test may run. When `ok` is false: prints `what` and skips, or panics when
/// the environment says `CI=true` (CI must never pass by skipping).
#[track_caller]
pub fn prerequisite(ok: bool, what: &str) -> bool {
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "prerequisite missing under CI=true: {what}"
        );
        eprintln!("SKIPPED: {what}");
    }
    ok
}
