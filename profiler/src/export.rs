//! Exporters: where finished profiles go.
//!
//! The report stage calls every configured [`Exporter`] with each profile, on its blocking
//! thread, so an exporter must not wait on the network: [`FileExporter`] (one file, for
//! `record`), [`ArchiveExporter`] (a directory with retention, the default of `run`) and the
//! remote ones of [`crate::remote`] (which only spool and wake their sender).
use std::{
    fs, io,
    path::{Path, PathBuf},
    time::SystemTime,
};

use tracing::debug;

/// A gzip'd pprof profile and the window it covers.
#[derive(Debug, Clone)]
pub struct EncodedProfile {
    pub gzip: Vec<u8>,
    pub start: SystemTime,
    pub end: SystemTime,
    pub samples: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("output directory {path}: {source}")]
    Directory { path: PathBuf, source: io::Error },
    #[error("output file {path}: the directory {dir} does not exist")]
    NoParent { path: PathBuf, dir: PathBuf },
    #[error("spooling: {0}")]
    Spool(String),
}

pub trait Exporter: Send {
    fn name(&self) -> &str;
    /// Delivers one profile; returns the file written, if the exporter writes files.
    fn export(&mut self, profile: &EncodedProfile) -> Result<Option<PathBuf>, ExportError>;
}

/// Writes to `path` atomically (temporary file, then rename), so readers never see half a file.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ExportError> {
    let err = |source| ExportError::Write {
        path: path.to_owned(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    fs::write(&tmp, bytes).map_err(err)?;
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        err(e)
    })
}

/// One profile to one file (`profiler record --output`).
pub struct FileExporter {
    path: PathBuf,
}

impl FileExporter {
    /// Checks the destination directory up front, so a typo fails before recording.
    pub fn new(path: PathBuf) -> Result<Self, ExportError> {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        if !dir.is_dir() {
            return Err(ExportError::NoParent { path, dir });
        }
        Ok(Self { path })
    }
}

impl Exporter for FileExporter {
    fn name(&self) -> &str {
        "file"
    }

    fn export(&mut self, profile: &EncodedProfile) -> Result<Option<PathBuf>, ExportError> {
        write_atomically(&self.path, &profile.gzip)?;
        Ok(Some(self.path.clone()))
    }
}

/// A directory of `cpu-<UTC start time>.pb.gz` files, oldest deleted first past either limit.
/// The newest profile is always kept, even when it alone exceeds the byte limit.
pub struct ArchiveExporter {
    dir: PathBuf,
    retain_count: usize,
    retain_bytes: u64,
}

const ARCHIVE_PREFIX: &str = "cpu-";
const ARCHIVE_SUFFIX: &str = ".pb.gz";

impl ArchiveExporter {
    pub fn new(dir: PathBuf, retain_count: usize, retain_bytes: u64) -> Result<Self, ExportError> {
        fs::create_dir_all(&dir).map_err(|source| ExportError::Directory {
            path: dir.clone(),
            source,
        })?;
        Ok(Self {
            dir,
            retain_count: retain_count.max(1),
            retain_bytes,
        })
    }

    /// Archive files, oldest first (names sort by time).
    pub fn files(&self) -> Result<Vec<(PathBuf, u64)>, ExportError> {
        let err = |source| ExportError::Directory {
            path: self.dir.clone(),
            source,
        };
        let mut files = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(err)? {
            let entry = entry.map_err(err)?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with(ARCHIVE_PREFIX) && name.ends_with(ARCHIVE_SUFFIX) {
                let size = entry.metadata().map_err(err)?.len();
                files.push((entry.path(), size));
            }
        }
        files.sort();
        Ok(files)
    }

    fn enforce_retention(&self) -> Result<(), ExportError> {
        let files = self.files()?;
        let mut count = files.len();
        let mut bytes: u64 = files.iter().map(|(_, size)| size).sum();
        for (path, size) in &files {
            if count <= 1 || (count <= self.retain_count && bytes <= self.retain_bytes) {
                break;
            }
            fs::remove_file(path).map_err(|source| ExportError::Write {
                path: path.clone(),
                source,
            })?;
            debug!(path = %path.display(), "retention removed profile");
            count -= 1;
            bytes -= size;
        }
        Ok(())
    }
}

/// `20261121T203000.123Z`: sortable, no characters that need quoting.
pub fn file_timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t)
        .to_string()
        .chars()
        .filter(|c| *c != '-' && *c != ':')
        .collect()
}

impl Exporter for ArchiveExporter {
    fn name(&self) -> &str {
        "archive"
    }

    fn export(&mut self, profile: &EncodedProfile) -> Result<Option<PathBuf>, ExportError> {
        let path = self.dir.join(format!(
            "{ARCHIVE_PREFIX}{}{ARCHIVE_SUFFIX}",
            file_timestamp(profile.start)
        ));
        write_atomically(&path, &profile.gzip)?;
        self.enforce_retention()?;
        Ok(Some(path))
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    fn profile(secs: u64, size: usize) -> EncodedProfile {
        let start = UNIX_EPOCH + Duration::from_secs(secs);
        EncodedProfile {
            gzip: vec![7; size],
            start,
            end: start + Duration::from_secs(15),
            samples: 1,
        }
    }

    #[test]
    fn archive_keeps_newest_within_count_and_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut archive = ArchiveExporter::new(dir.path().join("a"), 3, 10_000).expect("archive");
        for i in 0..5 {
            archive
                .export(&profile(1_700_000_000 + i * 15, 100))
                .expect("export");
        }
        let names: Vec<String> = archive
            .files()
            .expect("files")
            .iter()
            .map(|(p, _)| p.file_name().and_then(|n| n.to_str()).expect("utf8").to_owned())
            .collect();
        assert_eq!(
            names,
            [
                "cpu-20231114T221350.000Z.pb.gz",
                "cpu-20231114T221405.000Z.pb.gz",
                "cpu-20231114T221420.000Z.pb.gz"
            ]
        );

        let mut small = ArchiveExporter::new(dir.path().join("b"), 100, 250).expect("archive");
        for i in 0..4 {
            small.export(&profile(1_700_000_000 + i, 100)).expect("export");
        }
        assert_eq!(
            small.files().expect("files").len(),
            2,
            "250 bytes hold two 100-byte files"
        );
        let mut tiny = ArchiveExporter::new(dir.path().join("c"), 100, 10).expect("archive");
        tiny.export(&profile(1_700_000_000, 100)).expect("export");
        tiny.export(&profile(1_700_000_001, 100)).expect("export");
        assert_eq!(tiny.files().expect("files").len(), 1, "the newest is always kept");
    }

    #[test]
    fn file_exporter_rejects_missing_directory() {
        let err = FileExporter::new(PathBuf::from("/nonexistent-dir/p.pb.gz"))
            .err()
            .expect("error");
        assert_eq!(
            err.to_string(),
            "output file /nonexistent-dir/p.pb.gz: the directory /nonexistent-dir does not exist"
        );
        assert!(FileExporter::new(PathBuf::from("relative.pb.gz")).is_ok());
    }
}
