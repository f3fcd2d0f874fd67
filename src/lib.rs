//! shiftfs: shifting bind mounts for user-namespaced containers.
//!
//! Layout (see `../shared/ARCHITECTURE.md`): `idmap` and `xattr` are pure; `fuse` and
//! `kernel` are the two backends; `mount` picks one and runs the daemon life cycle;
//! `offline` shifts and scans trees on disk; `sys` is the only home of `unsafe`.
#![deny(unsafe_code)]

pub mod broker;
pub mod daemon;
pub mod doctor;
pub mod fuse;
pub mod idmap;
pub mod kernel;
pub mod mount;
pub mod mountinfo;
pub mod offline;
pub mod options;
pub mod pathtext;
pub mod registry;
pub mod resolve;
pub mod sandbox;
pub mod sys;
pub mod xattr;
