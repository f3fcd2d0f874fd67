//! TEMP STUB
use std::path::Path;
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("stub")]
    Stub,
}
pub struct Probe {
    pub supported: bool,
    pub reason: String,
    pub fstype: String,
    pub advice: Option<String>,
}
pub fn probe(_s: &Path) -> Probe {
    Probe {
        supported: false,
        reason: "stub".into(),
        fstype: String::new(),
        advice: None,
    }
}
pub fn mount(
    _s: &Path,
    _t: &Path,
    _m: &crate::idmap::IdMapping,
    _f: crate::mount::MountFlags,
    _r: bool,
) -> Result<(), Error> {
    Err(Error::Stub)
}
