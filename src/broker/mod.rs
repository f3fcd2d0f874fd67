//! `shiftfsd`, the broker that gives non-root users shifted mounts under the
//! administrator's policy (issue 13). What works so far: the subid, policy and rule checks,
//! the wire protocol, the audit log, the socket server, and performing kernel-backend
//! mounts onto a target directory, unmounts and lists for the mounts' owners. FUSE and
//! detached mounts, `make-image` and `adopt` are still answered "not implemented yet".
//!
//! `rules` is pure; `server` resolves the facts it needs (peer credentials, source and
//! target owners) and feeds them in; `audit` records every decision.

pub mod audit;
pub mod policy;
pub mod protocol;
pub mod rules;
pub mod server;
pub mod subid;
