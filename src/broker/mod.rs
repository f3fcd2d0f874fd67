//! `shiftfsd`, the broker that gives non-root users shifted mounts under the
//! administrator's policy (issue 13): mounts of either backend onto a directory the caller
//! owns or as a detached mount fd, unmounts and lists of the caller's own mounts, and the
//! two operations that make a user's image (`make-image`, `adopt`). `client` is the side
//! `shiftfs` uses when run by a user who is not root.
//!
//! `rules` is pure; `server` resolves the facts it needs (peer credentials, source and
//! target owners) and feeds them in; `audit` records every decision.

pub mod audit;
pub mod client;
pub mod lock;
pub mod policy;
pub mod protocol;
pub mod rules;
pub mod server;
pub mod subid;
