//! The one reader of `/proc/<pid>/{maps,status,stat,cgroup}`.
//!
//! The unwind stage and the process registry both see a process through [`read_exec_mappings`]:
//! one mapping type ([`ExecMapping`]), one file identity ([`FileKey`]) decided once per read,
//! and one list of paths to open a mapped file ([`mapped_file_paths`]). A file identified here
//! has the same key for the unwinder's tables and the symbolizer's cache, deleted files
//! included.
use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use procfs::process::{MMPermissions, MMapPath, Process};

use crate::rootfs::{self, FilePath, Identity};

/// Identity of a mapped file: device and inode as /proc/<pid>/maps shows them, plus size and
/// modification time from stat, because filesystems reuse the inode of a deleted file. A file
/// that could not be stat'ed through any of its paths keeps zero size and mtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileKey {
    pub dev: (i32, i32),
    pub inode: u64,
    pub size: u64,
    pub mtime_ns: i128,
}

impl FileKey {
    /// The key of a file found at a candidate path: `dev` and `inode` from /proc/<pid>/maps,
    /// size and modification time from what fstat showed of it.
    pub fn of(dev: (i32, i32), inode: u64, seen: &Identity) -> Self {
        FileKey {
            dev,
            inode,
            size: seen.size,
            mtime_ns: seen.mtime_ns,
        }
    }
}

/// What an executable mapping holds.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MappingKind {
    File {
        key: FileKey,
        /// Path as the process sees it (without a ` (deleted)` suffix).
        path: String,
        deleted: bool,
    },
    /// `[vdso]`, `[vsyscall]`, anonymous executable memory (JIT code, shown as `[anon]`),
    /// `[anon:name]`, `[heap]`, `[stack]`.
    Special(Arc<str>),
}

/// One executable mapping of a process.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ExecMapping {
    pub start: u64,
    pub end: u64,
    /// File offset of `start`.
    pub offset: u64,
    pub kind: MappingKind,
}

/// The name /proc/<pid>/maps gives the vDSO.
pub const VDSO: &str = "[vdso]";
/// The legacy vsyscall page: executable, but no code any process runs today.
pub const VSYSCALL: &str = "[vsyscall]";

/// The executable mappings of `pid`, sorted by start address. Each file mapping's [`FileKey`]
/// comes from the first of [`mapped_file_paths`] that is a regular file with the mapped inode.
pub fn read_exec_mappings(proc_root: &Path, pid: u32) -> Result<Vec<ExecMapping>, procfs::ProcError> {
    let proc_dir = proc_root.join(pid.to_string());
    let process = Process::new_with_root(proc_dir.clone())?;
    exec_mappings(&process, &proc_dir)
}

/// A process as the registry reads it: its executable mappings (as [`read_exec_mappings`]),
/// its name (`comm` of its stat) and its executable path (the `exe` link, with the kernel's
/// ` (deleted)` suffix when the binary was replaced), through one handle on `/proc/<pid>`.
#[derive(Debug)]
pub struct ProcessView {
    pub mappings: Vec<ExecMapping>,
    pub comm: Option<String>,
    pub exe: Option<String>,
}

/// Reads [`ProcessView`]; fails only when the mappings cannot be read (the process is gone).
pub fn read_process(proc_root: &Path, pid: u32) -> Result<ProcessView, procfs::ProcError> {
    let proc_dir = proc_root.join(pid.to_string());
    let process = Process::new_with_root(proc_dir.clone())?;
    let mappings = exec_mappings(&process, &proc_dir)?;
    Ok(ProcessView {
        mappings,
        comm: process.stat().ok().map(|s| s.comm),
        exe: process.exe().ok().map(|e| e.display().to_string()),
    })
}

fn exec_mappings(process: &Process, proc_dir: &Path) -> Result<Vec<ExecMapping>, procfs::ProcError> {
    let maps = process.maps()?;
    let mut out: Vec<ExecMapping> = maps
        .into_iter()
        .filter(|m| m.perms.contains(MMPermissions::EXECUTE))
        .map(|m| ExecMapping {
            start: m.address.0,
            end: m.address.1,
            offset: m.offset,
            kind: mapping_kind(proc_dir, m.pathname, m.dev, m.inode, m.address),
        })
        .collect();
    out.sort_unstable_by_key(|m| m.start);
    Ok(out)
}

fn mapping_kind(
    proc_dir: &Path,
    path: MMapPath,
    dev: (i32, i32),
    inode: u64,
    range: (u64, u64),
) -> MappingKind {
    match path {
        MMapPath::Path(p) if inode != 0 => {
            let text = p.to_string_lossy();
            let (path, deleted) = match text.strip_suffix(DELETED) {
                Some(stripped) => (stripped.to_owned(), true),
                None => (text.into_owned(), false),
            };
            let key = identify(proc_dir, &path, deleted, range, dev, inode);
            MappingKind::File { key, path, deleted }
        }
        MMapPath::Path(p) => MappingKind::Special(p.to_string_lossy().into()),
        MMapPath::Vdso => MappingKind::Special(VDSO.into()),
        MMapPath::Vsyscall => MappingKind::Special(VSYSCALL.into()),
        MMapPath::Heap => MappingKind::Special("[heap]".into()),
        MMapPath::Stack | MMapPath::TStack(_) => MappingKind::Special("[stack]".into()),
        MMapPath::Other(name) => MappingKind::Special(name.into()),
        MMapPath::Anonymous | MMapPath::Vvar | MMapPath::Rollup | MMapPath::Vsys(_) => {
            MappingKind::Special("[anon]".into())
        }
    }
}

/// The key of a mapped file: stat of the first candidate path that is a regular file with the
/// mapped inode (a path that now names another file is skipped), else zero size and mtime.
fn identify(
    proc_dir: &Path,
    path: &str,
    deleted: bool,
    range: (u64, u64),
    dev: (i32, i32),
    inode: u64,
) -> FileKey {
    mapped_file_paths(proc_dir, path, deleted, range)
        .into_iter()
        .filter_map(|candidate| rootfs::identify(&candidate).ok())
        .find(|seen| seen.regular && seen.inode == inode)
        .map_or(
            FileKey {
                dev,
                inode,
                size: 0,
                mtime_ns: 0,
            },
            |seen| FileKey::of(dev, inode, &seen),
        )
}

/// What the kernel appends to the path of a file that was deleted or replaced since it was
/// mapped (or exec'd).
pub const DELETED: &str = " (deleted)";

/// `path` without the kernel's [`DELETED`] suffix.
pub fn strip_deleted(path: &str) -> &str {
    path.strip_suffix(DELETED).unwrap_or(path)
}

/// `/proc/<pid>/root`: the process's own root directory (its mount namespace), through which
/// its files are opened.
pub fn root_of(proc_root: &Path, pid: u32) -> PathBuf {
    proc_root.join(pid.to_string()).join("root")
}

/// Where a file mapped by a process can be opened, in order: its path resolved inside the
/// process's root (not for deleted files), then `map_files` of the mapping `[start, end)`,
/// which the kernel makes and which names the mapped file itself.
pub fn mapped_file_paths(
    proc_dir: &Path,
    path: &str,
    deleted: bool,
    (start, end): (u64, u64),
) -> Vec<FilePath> {
    let mut candidates = Vec::with_capacity(2);
    if !deleted {
        candidates.push(FilePath::in_root(proc_dir.join("root"), path));
    }
    candidates.push(FilePath::Trusted(
        proc_dir.join("map_files").join(format!("{start:x}-{end:x}")),
    ));
    candidates
}

/// The process a pid (or thread id) belongs to (`Tgid:` of its status), if it exists.
pub fn thread_group(proc_root: &Path, pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(proc_root.join(pid.to_string()).join("status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
        .or(Some(pid))
}

/// Last `NSpid` entry of /proc/<pid>/status: the pid in the process's own namespace.
pub fn namespace_pid(proc_dir: &Path) -> Option<u32> {
    let status = std::fs::read_to_string(proc_dir.join("status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

/// The text of `/proc/<pid>/cgroup`.
pub fn cgroup_file(proc_root: &Path, pid: u32) -> Option<String> {
    std::fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup")).ok()
}

/// Processes with at least one thread running or runnable (state `R`). The daemon is among
/// them, as it is running while it looks.
pub fn running_processes(proc_root: &Path) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    let pids = dir.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok());
    pids.filter(|pid| {
        let tasks = proc_root.join(pid.to_string()).join("task");
        let Ok(tasks) = std::fs::read_dir(tasks) else {
            return false;
        };
        tasks.flatten().any(|task| {
            std::fs::read(task.path().join("stat"))
                .ok()
                .and_then(|stat| stat_state(&stat))
                == Some(b'R')
        })
    })
    .collect()
}

/// The state letter of a /proc/<pid>/stat line: the first field after the `)` that ends the
/// command name (which may itself hold spaces and parentheses).
fn stat_state(stat: &[u8]) -> Option<u8> {
    let close = stat.iter().rposition(|&b| b == b')')?;
    stat.get(close + 2).copied()
}

/// Whether `/proc/<pid>` still exists.
pub fn exists(proc_root: &Path, pid: u32) -> bool {
    proc_root.join(pid.to_string()).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_mappings_name_this_test_binary_with_its_stat_identity() {
        use std::os::unix::fs::MetadataExt as _;
        let maps = read_exec_mappings(Path::new("/proc"), std::process::id()).expect("own maps");
        assert!(
            maps.windows(2).all(|w| w[0].start <= w[1].start),
            "sorted by start"
        );
        let exe = std::fs::canonicalize("/proc/self/exe").expect("own exe");
        let meta = std::fs::metadata(&exe).expect("stat own exe");
        let own = maps
            .iter()
            .find_map(|m| match &m.kind {
                MappingKind::File { key, path, deleted } if Path::new(path) == exe => Some((*key, *deleted)),
                _ => None,
            })
            .expect("the test binary is mapped executable");
        assert_eq!(
            own,
            (FileKey::of(own.0.dev, meta.ino(), &Identity::from(&meta)), false)
        );
        assert!(
            maps.iter()
                .any(|m| matches!(&m.kind, MappingKind::Special(name) if &**name == VDSO)),
            "the vDSO is an executable mapping"
        );
    }

    #[test]
    fn a_deleted_file_is_identified_through_map_files() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("gone.bin");
        std::fs::write(&file, vec![0xc3u8; 8192]).expect("write");
        let meta = std::fs::metadata(&file).expect("stat");
        let proc_dir = PathBuf::from("/proc/self");
        // Deleted: only map_files is a candidate; a range that maps nothing resolves to no file.
        let candidates = mapped_file_paths(&proc_dir, "/x/gone.bin", true, (0x1000, 0x2000));
        assert_eq!(
            candidates,
            [FilePath::Trusted(proc_dir.join("map_files/1000-2000"))]
        );
        let key = identify(
            &proc_dir,
            "/x/gone.bin",
            true,
            (0x1000, 0x2000),
            (8, 1),
            meta.ino(),
        );
        assert_eq!((key.size, key.mtime_ns), (0, 0), "no path names the file: zeros");
        // Present: the root path is tried first.
        let path = file.to_str().expect("utf-8 path");
        let key = identify(&proc_dir, path, false, (0x1000, 0x2000), (8, 1), meta.ino());
        assert_eq!(key, FileKey::of((8, 1), meta.ino(), &Identity::from(&meta)));
        // A path that now names another inode is not the mapped file.
        let other = identify(&proc_dir, path, false, (0x1000, 0x2000), (8, 1), meta.ino() + 1);
        assert_eq!((other.size, other.mtime_ns), (0, 0));
    }

    #[test]
    fn stat_state_skips_a_command_name_with_parentheses() {
        assert_eq!(stat_state(b"42 (a) b) R 1 2"), Some(b'R'));
        assert_eq!(stat_state(b"42 (sleep) S 1"), Some(b'S'));
        assert_eq!(stat_state(b"garbage"), None);
        assert_eq!(strip_deleted("/usr/bin/x (deleted)"), "/usr/bin/x");
    }
}
