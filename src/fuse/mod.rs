//! TEMP STUB (lead's tree only, replaced by the fuse branch)
use crate::idmap::IdMapping;
pub struct Options {
    pub mapping: IdMapping,
    pub flags: crate::mount::MountFlags,
    pub threads: usize,
    pub passthrough: bool,
    pub attr_timeout: std::time::Duration,
    pub fsname: String,
}
impl Options {
    pub fn new(mapping: IdMapping) -> Self {
        Self {
            mapping,
            flags: Default::default(),
            threads: 0,
            passthrough: true,
            attr_timeout: std::time::Duration::from_secs(1),
            fsname: String::new(),
        }
    }
}
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("stub")]
    Stub,
}
pub struct Session;
impl Session {
    pub fn wait(self) -> Result<(), Error> {
        Ok(())
    }
}
pub fn mount(
    _s: std::os::fd::OwnedFd,
    _t: &std::path::Path,
    _o: Options,
) -> Result<Session, Error> {
    Err(Error::Stub)
}
