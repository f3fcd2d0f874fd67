//! `shiftfsd`, the broker that gives non-root users shifted mounts under the
//! administrator's policy (issue 13). What works so far: the subid, policy and rule checks,
//! the wire protocol, the audit log and the socket server; mounting itself is not wired yet,
//! so every allowed mount is still answered "not implemented yet".
//!
//! `rules` is pure; `server` resolves the facts it needs (peer credentials, source and
//! target owners) and feeds them in; `audit` records every decision.

pub mod audit;
pub mod policy;
pub mod protocol;
pub mod rules;
pub mod server;
pub mod subid;
