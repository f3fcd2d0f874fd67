//! Thin syscall wrappers that rustix lacks: the only home of `unsafe` in the crate.
//! Every unsafe block carries a `// SAFETY:` line.
#![allow(unsafe_code)]

pub mod creds;
pub mod daemon;
pub mod fdpass;
pub mod fhandle;
pub mod fileattr;
pub mod fusedev;
pub mod inherit;
pub mod mount;
pub mod process;
pub mod procfd;
pub mod statmount;
pub mod userns;
pub mod xattr;
