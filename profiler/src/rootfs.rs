//! The one way the daemon opens a file a process names: a mapped binary, a debug file, a perf
//! map. Every path and every link in a container's root is the container's to choose, so:
//!
//! - a path is resolved *inside* the process's root (`/proc/<pid>/root`) with `openat2`'s
//!   `RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS`: an absolute symlink or `..` stays in that root,
//!   and a magic link (`/proc/1/root`, `/proc/self/fd/N`) is refused. Where `openat2` is
//!   missing (before Linux 5.6, or filtered by seccomp) the path is walked one component at a
//!   time with `O_NOFOLLOW`, and each link is expanded by hand under the same two rules;
//! - the file is first opened `O_PATH`, which runs no driver and cannot block on a FIFO, and
//!   its type is read from that descriptor: anything but a regular file (FIFO, device, socket,
//!   directory) is refused before it is opened for reading;
//! - the file is then opened for reading through that same descriptor (`/proc/thread-self/fd`),
//!   `O_NONBLOCK | O_NOCTTY`, so a rename between the check and the open cannot swap it;
//! - with an expected inode (from `/proc/<pid>/maps`) a different file is refused.
//!
//! A kernel-made path (`/proc/<pid>/map_files/<range>`, `/proc/self/exe`) names the mapped
//! file itself and is opened as it is ([`FilePath::Trusted`], as are the daemon's own paths), with the same type and inode checks. Refusals are
//! counted by reason ([`REFUSALS`], in /metrics) and logged once per file.
use std::{
    collections::VecDeque,
    ffi::OsString,
    fmt,
    fs::{File, Metadata},
    os::{
        fd::{AsFd as _, AsRawFd as _, OwnedFd},
        unix::{
            ffi::{OsStrExt as _, OsStringExt as _},
            fs::MetadataExt as _,
        },
    },
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
};

use rustix::{
    fs::{Mode, OFlags, ResolveFlags},
    io::Errno,
};

use crate::limits::LogOnce;

/// Where a file is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilePath {
    /// `path` as a process sees it, resolved inside `root` (its `/proc/<pid>/root`).
    InRoot { root: PathBuf, path: String },
    /// A path that names one file whatever a process does: one the kernel made
    /// (`map_files/<range>`, `/proc/self/exe`) or one the daemon chose itself.
    Trusted(PathBuf),
}

impl FilePath {
    pub fn in_root(root: impl Into<PathBuf>, path: impl Into<String>) -> Self {
        FilePath::InRoot {
            root: root.into(),
            path: path.into(),
        }
    }
}

impl From<&Path> for FilePath {
    fn from(path: &Path) -> Self {
        FilePath::Trusted(path.to_path_buf())
    }
}

impl From<&PathBuf> for FilePath {
    fn from(path: &PathBuf) -> Self {
        FilePath::Trusted(path.clone())
    }
}

impl From<PathBuf> for FilePath {
    fn from(path: PathBuf) -> Self {
        FilePath::Trusted(path)
    }
}

impl fmt::Display for FilePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FilePath::InRoot { root, path } => {
                write!(f, "{}/{}", root.display(), path.trim_start_matches('/'))
            }
            FilePath::Trusted(path) => write!(f, "{}", path.display()),
        }
    }
}

/// Why a file was not opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The path does not name a file (a missing file or directory on the way): not a refusal.
    #[error("{path}: {source}")]
    Missing { path: String, source: std::io::Error },
    #[error("{path}: refused, {reason}")]
    Refused { path: String, reason: Refusal },
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
}

/// Why a file a process named was refused. Each is a counter in /metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The path goes through a magic link (`/proc/<pid>/root`, `/proc/self/fd/N`) or more
    /// links than the kernel follows (40).
    Link,
    /// A FIFO, device, socket or directory where a regular file was expected.
    NotRegular,
    /// Not the inode `/proc/<pid>/maps` shows: replaced since it was mapped.
    Replaced,
}

impl Refusal {
    pub const ALL: [Refusal; 3] = [Refusal::Link, Refusal::NotRegular, Refusal::Replaced];

    /// The `reason` label in /metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Link => "link",
            Refusal::NotRegular => "not_regular",
            Refusal::Replaced => "replaced",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::Link => "the path leads through a magic link or too many links",
            Refusal::NotRegular => "not a regular file",
            Refusal::Replaced => "not the inode that is mapped (replaced since)",
        })
    }
}

/// Refused opens, by reason, since start; and which files were logged already.
pub struct Refusals {
    counts: [AtomicU64; 3],
    logged: LogOnce,
}

impl Refusals {
    const fn new() -> Self {
        Self {
            counts: [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
            logged: LogOnce::new(),
        }
    }

    pub fn count(&self, reason: Refusal) -> u64 {
        self.counts[reason as usize].load(Ordering::Relaxed)
    }

    fn record(&self, reason: Refusal, path: &str) {
        self.counts[reason as usize].fetch_add(1, Ordering::Relaxed);
        if self.logged.first(&(reason, path)) {
            tracing::warn!(
                path,
                reason = reason.as_str(),
                "refused to open a file a process named: {reason}"
            );
        }
    }
}

/// Every refusal of this process.
pub static REFUSALS: Refusals = Refusals::new();

/// What `fstat` shows of a file, without opening it for reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub regular: bool,
    pub dev: u64,
    pub inode: u64,
    pub size: u64,
    pub mtime_ns: i128,
}

impl From<&Metadata> for Identity {
    fn from(meta: &Metadata) -> Self {
        Identity {
            regular: meta.is_file(),
            dev: meta.dev(),
            inode: meta.ino(),
            size: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        }
    }
}

/// [`Identity`] of the file at `at`, resolved as [`open`] does; the file is not opened for
/// reading and nothing is refused (the caller decides what the identity allows).
pub fn identify(at: &FilePath) -> Result<Identity, OpenError> {
    let handle = locate(at)?;
    stat_of(at, &handle)
}

/// Opens `at` for reading as described in the module docs; with `inode`, only that inode.
pub fn open(at: &FilePath, inode: Option<u64>) -> Result<(File, Metadata), OpenError> {
    let shown = || at.to_string();
    let handle = locate(at)?;
    let seen = stat_of(at, &handle)?;
    if !seen.regular {
        return Err(refuse(shown(), Refusal::NotRegular));
    }
    if inode.is_some_and(|expected| expected != seen.inode) {
        return Err(refuse(shown(), Refusal::Replaced));
    }
    let file = File::from(reopen(&handle).map_err(|errno| OpenError::Io {
        path: shown(),
        source: errno.into(),
    })?);
    let meta = file.metadata().map_err(|source| OpenError::Io {
        path: shown(),
        source,
    })?;
    // The descriptor is the one checked above; a different file here means /proc lied.
    if !meta.is_file() || meta.ino() != seen.inode || meta.dev() != seen.dev {
        return Err(refuse(shown(), Refusal::Replaced));
    }
    Ok((file, meta))
}

/// An `O_PATH` handle on the file `at` names.
fn locate(at: &FilePath) -> Result<OwnedFd, OpenError> {
    let located = match at {
        FilePath::InRoot { root, path } => locate_in_root(root, path),
        FilePath::Trusted(path) => rustix::fs::open(path, OFlags::PATH | OFlags::CLOEXEC, Mode::empty()),
    };
    located.map_err(|errno| match errno {
        Errno::NOENT | Errno::NOTDIR => OpenError::Missing {
            path: at.to_string(),
            source: errno.into(),
        },
        Errno::LOOP | Errno::XDEV => refuse(at.to_string(), Refusal::Link),
        _ => OpenError::Io {
            path: at.to_string(),
            source: errno.into(),
        },
    })
}

fn stat_of(at: &FilePath, handle: &OwnedFd) -> Result<Identity, OpenError> {
    let st = rustix::fs::fstat(handle).map_err(|errno| OpenError::Io {
        path: at.to_string(),
        source: errno.into(),
    })?;
    Ok(Identity {
        regular: rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile,
        dev: st.st_dev,
        inode: st.st_ino,
        size: u64::try_from(st.st_size).unwrap_or(0),
        mtime_ns: i128::from(st.st_mtime) * 1_000_000_000 + i128::from(st.st_mtime_nsec),
    })
}

fn refuse(path: String, reason: Refusal) -> OpenError {
    REFUSALS.record(reason, &path);
    OpenError::Refused { path, reason }
}

/// Opens an `O_PATH` handle for reading: through `/proc/thread-self/fd/N`, which names the
/// very file the handle holds, so nothing can be swapped in between.
fn reopen(handle: &OwnedFd) -> rustix::io::Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
    let link = format!("/proc/thread-self/fd/{}", handle.as_fd().as_raw_fd());
    rustix::fs::open(link.as_str(), flags, Mode::empty())
}

/// Set once `openat2` has been found missing, so later opens walk by hand at once.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// An `O_PATH` handle on `path` resolved inside `root`.
fn locate_in_root(root: &Path, path: &str) -> rustix::io::Result<OwnedFd> {
    let root = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let relative = path.trim_start_matches('/');
    let relative = if relative.is_empty() { "." } else { relative };
    if !NO_OPENAT2.load(Ordering::Relaxed) {
        // EAGAIN: a rename raced with `..` resolution; the kernel asks to try again.
        for _ in 0..4 {
            match rustix::fs::openat2(
                &root,
                relative,
                OFlags::PATH | OFlags::CLOEXEC,
                Mode::empty(),
                ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
            ) {
                Err(Errno::AGAIN) => continue,
                Err(Errno::NOSYS | Errno::PERM | Errno::INVAL) => {
                    NO_OPENAT2.store(true, Ordering::Relaxed);
                    break;
                }
                other => return other,
            }
        }
        if !NO_OPENAT2.load(Ordering::Relaxed) {
            return Err(Errno::AGAIN);
        }
    }
    walk_in_root(root, relative)
}

/// Most links one path may go through, as the kernel's own limit.
const MAX_LINKS: u32 = 40;
/// Longest link target read.
const MAX_LINK_TARGET: usize = 4096;

/// `RESOLVE_IN_ROOT` by hand: each component opened `O_PATH | O_NOFOLLOW` from the directory
/// before it; a link's target is read and spliced into the rest of the path, an absolute
/// target starting again at `root`, and `..` never goes above `root`. Magic links are never
/// followed by the kernel here (each is read as the text it shows, inside the root).
fn walk_in_root(root: OwnedFd, path: &str) -> rustix::io::Result<OwnedFd> {
    let mut rest: VecDeque<OsString> = components(path.as_bytes());
    // The directories from `root` down to where the walk is; `dirs[0]` is `root`.
    let mut dirs: Vec<OwnedFd> = vec![root];
    let mut links = 0;
    let mut last: Option<OwnedFd> = None;
    while let Some(name) = rest.pop_front() {
        if let Some(file) = last.take() {
            // A non-directory with components after it.
            drop(file);
            return Err(Errno::NOTDIR);
        }
        match name.as_bytes() {
            b"." => continue,
            b".." => {
                if dirs.len() > 1 {
                    dirs.pop();
                }
                continue;
            }
            _ => {}
        }
        let here = dirs.last().ok_or(Errno::NOENT)?;
        let fd = rustix::fs::openat(
            here,
            name.as_os_str(),
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let kind = rustix::fs::FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode);
        match kind {
            rustix::fs::FileType::Symlink => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(Errno::LOOP);
                }
                let target = rustix::fs::readlinkat(&fd, "", Vec::new())?.into_bytes();
                if target.len() > MAX_LINK_TARGET {
                    return Err(Errno::NAMETOOLONG);
                }
                if target.first() == Some(&b'/') {
                    dirs.truncate(1);
                }
                for part in components(&target).into_iter().rev() {
                    rest.push_front(part);
                }
            }
            rustix::fs::FileType::Directory => dirs.push(fd),
            _ => last = Some(fd),
        }
    }
    match last {
        Some(file) => Ok(file),
        None => {
            // The path named a directory: hand back a handle on it (its type is refused later).
            let dir = dirs.pop().ok_or(Errno::NOENT)?;
            Ok(dir)
        }
    }
}

fn components(path: &[u8]) -> VecDeque<OsString> {
    path.split(|&b| b == b'/')
        .filter(|part| !part.is_empty())
        .map(|part| OsString::from_vec(part.to_vec()))
        .collect()
}

/// Forces the hand walk, for tests of the fallback.
#[cfg(test)]
fn open_walking(root: &Path, path: &str) -> rustix::io::Result<OwnedFd> {
    let root = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    walk_in_root(root, path.trim_start_matches('/'))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    /// A container root with a file, links of every kind, and a "host" file outside it.
    struct Fixture {
        _dir: tempfile::TempDir,
        root: PathBuf,
        host_file: PathBuf,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        let host_file = dir.path().join("host-secret.map");
        std::fs::write(&host_file, "1000 10 host_secret_function\n").expect("host file");
        std::fs::create_dir_all(root.join("tmp")).expect("tmp");
        std::fs::create_dir_all(root.join("usr/lib")).expect("usr/lib");
        std::fs::write(root.join("usr/lib/libreal.so"), b"inside").expect("lib");
        std::fs::write(root.join("tmp/own.map"), "2000 10 own_function\n").expect("own map");
        // Absolute and relative links that stay inside once resolved in the root.
        symlink("/usr/lib/libreal.so", root.join("tmp/abs-link")).expect("link");
        symlink("../usr/lib/libreal.so", root.join("tmp/rel-link")).expect("link");
        symlink("lib", root.join("usr/lib64")).expect("dir link");
        // Links aimed at the host: by absolute path (which names the host file only from the
        // daemon's root), by `..` past the root, and through the daemon's own /proc.
        symlink(&host_file, root.join("tmp/perf-1.map")).expect("link");
        symlink(
            "../../../../../../../../host-secret.map",
            root.join("tmp/perf-2.map"),
        )
        .expect("link");
        symlink("/proc/self/root/etc/hostname", root.join("tmp/perf-3.map")).expect("link");
        symlink("loop-b", root.join("tmp/loop-a")).expect("link");
        symlink("loop-a", root.join("tmp/loop-b")).expect("link");
        Fixture {
            _dir: dir,
            root,
            host_file,
        }
    }

    fn read(at: &FilePath) -> Result<String, OpenError> {
        let (mut file, _) = open(at, None)?;
        let mut text = String::new();
        std::io::Read::read_to_string(&mut file, &mut text).expect("read");
        Ok(text)
    }

    #[test]
    fn links_resolve_inside_the_root_and_never_reach_the_host() {
        let f = fixture();
        let at = |p: &str| FilePath::in_root(&f.root, p);
        assert_eq!(read(&at("/usr/lib/libreal.so")).expect("plain"), "inside");
        assert_eq!(read(&at("/tmp/abs-link")).expect("absolute link"), "inside");
        assert_eq!(read(&at("/tmp/rel-link")).expect("relative link"), "inside");
        assert_eq!(
            read(&at("/usr/lib64/libreal.so")).expect("directory link"),
            "inside"
        );
        assert_eq!(
            read(&at("/../../tmp/own.map")).expect("dots above the root"),
            "2000 10 own_function\n"
        );
        // The host file exists, but from inside the root its path names nothing.
        assert!(f.host_file.exists());
        for name in ["/tmp/perf-1.map", "/tmp/perf-2.map"] {
            match read(&at(name)) {
                Err(OpenError::Missing { .. }) => {}
                other => panic!("{name} must not open the host file: {other:?}"),
            }
        }
        // /proc inside this root does not exist; in a container it would be a procfs, whose
        // magic links are refused (see the next test).
        assert!(matches!(
            read(&at("/tmp/perf-3.map")),
            Err(OpenError::Missing { .. })
        ));
        assert!(matches!(
            read(&at("/tmp/loop-a")),
            Err(OpenError::Refused {
                reason: Refusal::Link,
                ..
            })
        ));
    }

    #[test]
    fn magic_links_are_refused() {
        // This process's own /proc is a real procfs: `self/root` is a magic link to "/".
        let before = REFUSALS.count(Refusal::Link);
        let err = open(&FilePath::in_root("/proc", "/self/root/etc/hostname"), None).expect_err("magic link");
        assert!(
            matches!(
                err,
                OpenError::Refused {
                    reason: Refusal::Link,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(REFUSALS.count(Refusal::Link) > before);
        // By hand, the link is read as the text it shows ("/"), inside the root: the walk
        // stays in the root whatever the link says.
        let handle = open_walking(Path::new("/proc"), "/self/root/self/comm").expect("walked");
        let st = rustix::fs::fstat(&handle).expect("fstat");
        assert_eq!(
            rustix::fs::FileType::from_raw_mode(st.st_mode),
            rustix::fs::FileType::RegularFile
        );
    }

    #[test]
    fn fifos_devices_and_directories_are_refused_without_opening_them() {
        let f = fixture();
        let fifo = f.root.join("tmp/perf-9.map");
        let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).expect("cstring");
        // SAFETY: mkfifo reads a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        symlink("/dev/null", f.root.join("tmp/dev-link")).expect("link");
        std::fs::create_dir_all(f.root.join("dev")).expect("dev dir");
        for (name, expected) in [
            ("/tmp/perf-9.map", "a FIFO"),
            ("/tmp", "a directory"),
            ("/", "the root itself"),
        ] {
            match open(&FilePath::in_root(&f.root, name), None) {
                Err(OpenError::Refused {
                    reason: Refusal::NotRegular,
                    ..
                }) => {}
                other => panic!("{expected} must be refused: {other:?}"),
            }
        }
        // A device through a kernel path: typed from the O_PATH handle, never opened.
        match open(&FilePath::Trusted("/dev/null".into()), None) {
            Err(OpenError::Refused {
                reason: Refusal::NotRegular,
                ..
            }) => {}
            other => panic!("/dev/null must be refused: {other:?}"),
        }
        // The link to /dev/null resolves inside the root, where /dev/null does not exist.
        assert!(matches!(
            open(&FilePath::in_root(&f.root, "/tmp/dev-link"), None),
            Err(OpenError::Missing { .. })
        ));
    }

    #[test]
    fn an_expected_inode_refuses_another_file() {
        let f = fixture();
        let at = FilePath::in_root(&f.root, "/usr/lib/libreal.so");
        let inode = std::fs::metadata(f.root.join("usr/lib/libreal.so"))
            .expect("meta")
            .ino();
        assert!(open(&at, Some(inode)).is_ok());
        assert!(matches!(
            open(&at, Some(inode + 1)),
            Err(OpenError::Refused {
                reason: Refusal::Replaced,
                ..
            })
        ));
    }

    #[test]
    fn the_hand_walk_resolves_as_openat2_does() {
        let f = fixture();
        for name in [
            "/usr/lib/libreal.so",
            "/tmp/abs-link",
            "/tmp/rel-link",
            "/usr/lib64/libreal.so",
            "/../../tmp/own.map",
            "/tmp/perf-1.map",
            "/tmp/perf-2.map",
            "/tmp/loop-a",
            "/tmp/own.map/x",
        ] {
            let kernel =
                locate_in_root(&f.root, name).map(|fd| rustix::fs::fstat(&fd).expect("fstat").st_ino);
            let walked = open_walking(&f.root, name).map(|fd| rustix::fs::fstat(&fd).expect("fstat").st_ino);
            assert_eq!(kernel, walked, "{name}");
        }
    }
}
