//! The two backends behind one interface (`crate::mount` picks one): the kernel's idmapped
//! mounts where the source's filesystem supports them, and shiftfs' own FUSE filesystem
//! everywhere else. Both depend only on the options, the map model, fd resolution and `sys`.

pub mod fuse;
pub mod kernel;
