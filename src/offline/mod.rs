//! Work on trees on disk, without a mount: `walk` is the one walker (by fd, any depth),
//! `scan` reports what ids a tree uses, `shift` rewrites them with a crash-safe journal.

pub mod scan;
pub mod shift;
pub mod walk;
