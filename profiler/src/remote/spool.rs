//! The on-disk queue of one exporter: every profile is written here before it is sent
//! (write-ahead) and removed once the backend accepted it or rejected it for good.
//!
//! Files are named `<sequence>-<start ms>-<end ms>.pb.gz` and hold the gzip'd pprof, so the
//! order survives a restart and a crash loses nothing that was spooled. Past `max_bytes` the
//! oldest files are dropped (and counted); the newest is always kept.
use std::{
    collections::VecDeque,
    fs, io,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tracing::warn;

const SUFFIX: &str = ".pb.gz";

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool directory {path}: {source}")]
    Directory { path: PathBuf, source: io::Error },
    #[error("writing spool file {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// One spooled profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub seq: u64,
    pub start: SystemTime,
    pub end: SystemTime,
    /// The gzip'd pprof profile.
    pub gzip: Vec<u8>,
}

#[derive(Debug)]
struct Entry {
    seq: u64,
    start_ms: u64,
    end_ms: u64,
    bytes: u64,
}

#[derive(Debug, Default)]
struct State {
    entries: VecDeque<Entry>,
    bytes: u64,
    next_seq: u64,
}

#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
}

/// What a push did besides adding the profile.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PushOutcome {
    /// Oldest profiles deleted to stay under the byte limit.
    pub dropped: u64,
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn parse_name(name: &str) -> Option<(u64, u64, u64)> {
    let stem = name.strip_suffix(SUFFIX)?;
    let mut parts = stem.split('-');
    let seq = parts.next()?.parse().ok()?;
    let start = parts.next()?.parse().ok()?;
    let end = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some((seq, start, end))
}

impl Spool {
    /// Opens (creating if needed) the spool in `dir` and takes over what a previous run left.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, SpoolError> {
        let dir_err = |source| SpoolError::Directory {
            path: dir.to_owned(),
            source,
        };
        fs::create_dir_all(dir).map_err(dir_err)?;
        let mut entries = Vec::new();
        for entry in fs::read_dir(dir).map_err(dir_err)? {
            let entry = entry.map_err(dir_err)?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(".tmp") {
                // Half-written by a run that died mid-write: it was never acknowledged to anyone.
                let _ = fs::remove_file(entry.path());
                continue;
            }
            let Some((seq, start_ms, end_ms)) = parse_name(name) else {
                continue;
            };
            let bytes = entry.metadata().map_err(dir_err)?.len();
            entries.push(Entry {
                seq,
                start_ms,
                end_ms,
                bytes,
            });
        }
        entries.sort_by_key(|e| e.seq);
        let state = State {
            bytes: entries.iter().map(|e| e.bytes).sum(),
            next_seq: entries.last().map_or(0, |e| e.seq + 1),
            entries: entries.into(),
        };
        Ok(Self {
            dir: dir.to_owned(),
            max_bytes,
            state: Mutex::new(state),
        })
    }

    fn path(&self, e: &Entry) -> PathBuf {
        self.dir
            .join(format!("{:020}-{}-{}{SUFFIX}", e.seq, e.start_ms, e.end_ms))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (every update is one step).
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Appends a profile (durably, before returning) and enforces the byte limit.
    pub fn push(&self, start: SystemTime, end: SystemTime, gzip: &[u8]) -> Result<PushOutcome, SpoolError> {
        let mut state = self.lock();
        let entry = Entry {
            seq: state.next_seq,
            start_ms: millis(start),
            end_ms: millis(end),
            bytes: gzip.len() as u64,
        };
        let path = self.path(&entry);
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        let write_err = |source| SpoolError::Write {
            path: path.clone(),
            source,
        };
        fs::write(&tmp, gzip).map_err(write_err)?;
        fs::rename(&tmp, &path).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            write_err(e)
        })?;
        state.next_seq += 1;
        state.bytes += entry.bytes;
        state.entries.push_back(entry);
        let mut outcome = PushOutcome::default();
        while state.bytes > self.max_bytes && state.entries.len() > 1 {
            let Some(old) = state.entries.pop_front() else {
                break;
            };
            state.bytes -= old.bytes;
            outcome.dropped += 1;
            if let Err(error) = fs::remove_file(self.path(&old)) {
                warn!(%error, dir = %self.dir.display(), "removing a dropped spool file failed");
            }
        }
        Ok(outcome)
    }

    /// The oldest profile, read from disk. A file that cannot be read is removed (and
    /// counted in `unreadable`) and the next one is tried.
    pub fn oldest(&self, unreadable: &mut u64) -> Option<Item> {
        loop {
            let (seq, start_ms, end_ms, path) = {
                let state = self.lock();
                let e = state.entries.front()?;
                (e.seq, e.start_ms, e.end_ms, self.path(e))
            };
            match fs::read(&path) {
                Ok(gzip) => {
                    return Some(Item {
                        seq,
                        start: UNIX_EPOCH + Duration::from_millis(start_ms),
                        end: UNIX_EPOCH + Duration::from_millis(end_ms),
                        gzip,
                    });
                }
                Err(error) => {
                    warn!(%error, path = %path.display(), "spool file unreadable; dropping it");
                    *unreadable += 1;
                    self.remove(seq);
                }
            }
        }
    }

    /// Removes a profile once delivered or given up; a no-op when the byte limit already
    /// dropped it.
    pub fn remove(&self, seq: u64) {
        let mut state = self.lock();
        let Some(pos) = state.entries.iter().position(|e| e.seq == seq) else {
            return;
        };
        let Some(entry) = state.entries.remove(pos) else {
            return;
        };
        state.bytes -= entry.bytes;
        let path = self.path(&entry);
        drop(state);
        if let Err(error) = fs::remove_file(&path)
            && error.kind() != io::ErrorKind::NotFound
        {
            warn!(%error, path = %path.display(), "removing a sent spool file failed");
        }
    }

    pub fn contains(&self, seq: u64) -> bool {
        self.lock().entries.iter().any(|e| e.seq == seq)
    }

    /// (profiles, bytes) waiting.
    pub fn usage(&self) -> (u64, u64) {
        let state = self.lock();
        (state.entries.len() as u64, state.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(s)
    }

    #[test]
    fn profiles_come_back_in_order_and_survive_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(dir.path(), 1 << 20).expect("open");
        for i in 0..3u8 {
            spool
                .push(at(100 + u64::from(i) * 15), at(115 + u64::from(i) * 15), &[i; 10])
                .expect("push");
        }
        let mut bad = 0;
        let first = spool.oldest(&mut bad).expect("first");
        assert_eq!(
            (first.seq, first.gzip[0], first.start, first.end),
            (0, 0, at(100), at(115))
        );
        spool.remove(first.seq);
        assert_eq!(spool.usage(), (2, 20));
        // A half-written file of a crashed run is discarded; the rest resumes in order.
        fs::write(dir.path().join("x.pb.gz.tmp"), b"half").expect("write");
        drop(spool);
        let spool = Spool::open(dir.path(), 1 << 20).expect("reopen");
        assert_eq!(spool.usage(), (2, 20));
        assert!(!dir.path().join("x.pb.gz.tmp").exists());
        spool.push(at(200), at(215), &[9; 10]).expect("push");
        let order: Vec<u8> = std::iter::from_fn(|| {
            let item = spool.oldest(&mut bad)?;
            spool.remove(item.seq);
            Some(item.gzip[0])
        })
        .collect();
        assert_eq!(order, [1, 2, 9]);
        assert_eq!(bad, 0);
        assert_eq!(spool.usage(), (0, 0));
    }

    #[test]
    fn the_byte_limit_drops_the_oldest_and_keeps_the_newest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(dir.path(), 250).expect("open");
        let mut dropped = 0;
        for i in 0..4u8 {
            dropped += spool
                .push(at(u64::from(i)), at(1), &[i; 100])
                .expect("push")
                .dropped;
        }
        assert_eq!(dropped, 2);
        assert_eq!(spool.usage(), (2, 200));
        let mut bad = 0;
        assert_eq!(spool.oldest(&mut bad).expect("oldest").gzip[0], 2);
        let big = spool.push(at(9), at(10), &[7; 1000]).expect("push");
        assert_eq!(
            big.dropped, 2,
            "a profile larger than the limit is still kept alone"
        );
        assert_eq!(spool.usage(), (1, 1000));
        // A file deleted behind the spool's back is skipped and counted.
        for entry in fs::read_dir(dir.path()).expect("dir") {
            fs::remove_file(entry.expect("entry").path()).expect("rm");
        }
        assert!(spool.oldest(&mut bad).is_none());
        assert_eq!(bad, 1);
    }
}
