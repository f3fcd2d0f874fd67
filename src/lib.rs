//! shiftfs: shifting bind mounts for user-namespaced containers.
//!
//! Layout (see the README's Layout section): `options` is what a request says; `idmap` and
//! `xattr` are pure; `backend::{kernel, fuse}` are the two backends; `mount` resolves, checks
//! and picks one; `daemon` runs the FUSE daemon's life cycle inside `sandbox`; `registry`
//! remembers mounts; `offline` shifts and scans trees on disk; `broker` is the privileged
//! service for unprivileged users; `sys` is the only home of `unsafe`.
#![deny(unsafe_code)]

pub mod backend;
pub mod broker;
pub mod daemon;
pub mod doctor;
pub mod idmap;
pub mod mount;
pub mod mountinfo;
pub mod oci;
pub mod offline;
pub mod options;
pub mod pathtext;
pub mod registry;
pub mod resolve;
pub mod sandbox;
pub mod sys;
pub mod xattr;
