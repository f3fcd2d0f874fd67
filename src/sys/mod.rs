//! Thin syscall wrappers that rustix lacks: the only home of `unsafe` in the crate.
//! Every unsafe block carries a `// SAFETY:` line.
#![allow(unsafe_code)]

pub mod creds;
pub mod mount;
pub mod xattrat;
