//! Credentials kept in files (mounted Secrets), read again when they change.
use std::{
    fs,
    path::{Path, PathBuf},
    sync::Mutex,
    time::SystemTime,
};

/// A credential kept in a file (a mounted Secret). Read again whenever its modification time
/// or length changes, so a rotated token is used from the next send on.
#[derive(Debug)]
pub struct SecretFile {
    path: PathBuf,
    cached: Mutex<Option<(SystemTime, u64, String)>>,
}

impl SecretFile {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            cached: Mutex::new(None),
        }
    }

    pub fn get(&self) -> Result<String, String> {
        let meta = fs::metadata(&self.path).map_err(|e| format!("reading {}: {e}", self.path.display()))?;
        let stamp = (meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.len());
        let mut cached = self
            .cached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((modified, len, value)) = cached.as_ref()
            && (*modified, *len) == stamp
        {
            return Ok(value.clone());
        }
        let value = fs::read_to_string(&self.path)
            .map_err(|e| format!("reading {}: {e}", self.path.display()))?
            .trim()
            .to_owned();
        *cached = Some((stamp.0, stamp.1, value.clone()));
        Ok(value)
    }
}
