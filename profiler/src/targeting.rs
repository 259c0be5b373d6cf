//! Targeting in the kernel: which processes are sampled at all.
//!
//! `--pid` fills `TARGET_PIDS` once. `--cgroup` and `--target` (label selectors) are kept up to
//! date by [`Targeter::refresh`], which the targeting stage ([`crate::stages::targeting`]) runs
//! every two seconds:
//! - a `--cgroup` directory and every cgroup below it go into `TARGET_CGROUPS` (cgroup v2
//!   ids, the inode numbers of the directories), so containers started later under a selected
//!   pod or slice are picked up;
//! - a selector is matched against the labels of every process (discovered and relabeled as
//!   the samples' own, pod labels included): a matching process's cgroup goes into
//!   `TARGET_CGROUPS`, or, for a process in the root cgroup, its tgid into `TARGET_PIDS`.
//!
//! The BPF program then costs an unselected process one lookup per map in use and records
//! nothing (counted as filtered). A process newly matching a selector is sampled from the next
//! refresh on.
use std::{
    collections::HashSet,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use aya::maps::{HashMap, MapData};
use tracing::debug;

use crate::labels::{Labeler, Selector};

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("--cgroup {path}: {reason}")]
    Cgroup { path: PathBuf, reason: String },
    #[error("no cgroup v2 hierarchy is mounted (see /proc/self/mountinfo): --cgroup and --target need one")]
    NoCgroup2,
    #[error("updating {map}: {reason}")]
    Map { map: &'static str, reason: String },
}

/// The mount point of the cgroup v2 hierarchy (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified`
/// on hybrid hosts).
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|line| {
        // `… mount-point … - fstype source options`
        let (left, right) = line.split_once(" - ")?;
        let mount_point = left.split_whitespace().nth(4)?;
        (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
    })
}

/// Resolves a `--cgroup` argument to a directory of the v2 hierarchy.
pub fn resolve_cgroup(root: &Path, path: &Path) -> Result<PathBuf, TargetError> {
    let candidate = if path.starts_with(root) {
        path.to_owned()
    } else {
        root.join(path.strip_prefix("/").unwrap_or(path))
    };
    if !candidate.join("cgroup.procs").is_file() {
        return Err(TargetError::Cgroup {
            path: path.to_owned(),
            reason: format!(
                "{} is not a cgroup v2 directory (the hierarchy is mounted at {})",
                candidate.display(),
                root.display()
            ),
        });
    }
    Ok(candidate)
}

/// The cgroup ids of `dir` and every cgroup below it.
fn collect_cgroup_ids(dir: &Path, out: &mut HashSet<u64>) {
    let Ok(meta) = fs::metadata(dir) else { return };
    out.insert(meta.ino());
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            collect_cgroup_ids(&entry.path(), out);
        }
    }
}

pub struct Targeter {
    root: PathBuf,
    cgroups: Vec<PathBuf>,
    selectors: Vec<Selector>,
    labeler: Labeler,
    static_pids: Vec<u32>,
    cgroup_map: HashMap<MapData, u64, u8>,
    pid_map: Option<HashMap<MapData, u32, u8>>,
    in_cgroup_map: HashSet<u64>,
    in_pid_map: HashSet<u32>,
}

impl Targeter {
    pub fn new(
        cgroups: Vec<PathBuf>,
        selectors: Vec<Selector>,
        labeler: Labeler,
        static_pids: Vec<u32>,
        cgroup_map: HashMap<MapData, u64, u8>,
        pid_map: Option<HashMap<MapData, u32, u8>>,
    ) -> Result<Self, TargetError> {
        let root = cgroup2_mount().ok_or(TargetError::NoCgroup2)?;
        let cgroups = cgroups
            .iter()
            .map(|c| resolve_cgroup(&root, c))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            root,
            cgroups,
            selectors,
            labeler,
            in_pid_map: static_pids.iter().copied().collect(),
            static_pids,
            cgroup_map,
            pid_map,
            in_cgroup_map: HashSet::new(),
        })
    }

    /// Resolves the selection once and brings the maps in line.
    /// How many cgroups and label selectors the selection names.
    pub fn selection(&self) -> (usize, usize) {
        (self.cgroups.len(), self.selectors.len())
    }

    pub fn refresh(&mut self) -> Result<(), TargetError> {
        let mut cgroup_ids = HashSet::new();
        for dir in &self.cgroups {
            collect_cgroup_ids(dir, &mut cgroup_ids);
        }
        let mut pids: HashSet<u32> = self.static_pids.iter().copied().collect();
        if !self.selectors.is_empty() {
            self.match_processes(&mut cgroup_ids, &mut pids);
        }
        for id in cgroup_ids.difference(&self.in_cgroup_map) {
            self.cgroup_map.insert(id, 1, 0).map_err(|e| TargetError::Map {
                map: "TARGET_CGROUPS",
                reason: e.to_string(),
            })?;
        }
        for id in self.in_cgroup_map.difference(&cgroup_ids) {
            let _ = self.cgroup_map.remove(id);
        }
        if let Some(map) = &mut self.pid_map {
            for pid in pids.difference(&self.in_pid_map) {
                map.insert(pid, 1, 0).map_err(|e| TargetError::Map {
                    map: "TARGET_PIDS",
                    reason: e.to_string(),
                })?;
            }
            for pid in self.in_pid_map.difference(&pids) {
                let _ = map.remove(pid);
            }
            self.in_pid_map = pids;
        }
        if cgroup_ids != self.in_cgroup_map {
            debug!(cgroups = cgroup_ids.len(), "targeted cgroups changed");
        }
        self.in_cgroup_map = cgroup_ids;
        Ok(())
    }

    /// Adds the cgroups (or, in the root cgroup, the tgids) of processes a selector matches.
    fn match_processes(&self, cgroup_ids: &mut HashSet<u64>, pids: &mut HashSet<u32>) {
        let proc_root = Path::new("/proc");
        let Ok(entries) = fs::read_dir(proc_root) else {
            return;
        };
        for entry in entries.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let dir = entry.path();
            let comm = fs::read_to_string(dir.join("comm")).ok();
            let exe = fs::read_link(dir.join("exe"))
                .ok()
                .map(|p| p.display().to_string());
            let (meta, cgroup) = self.labeler.discover_with_cgroup(
                proc_root,
                pid,
                comm.as_deref().map(str::trim),
                exe.as_deref(),
            );
            let target = self.labeler.target(meta);
            if target.labels.is_none() {
                continue;
            }
            let matched = self
                .selectors
                .iter()
                .any(|sel| sel.iter().all(|(k, v)| target.get(k) == Some(v.as_str())));
            if !matched {
                continue;
            }
            // The v2 path the BPF program's cgroup id names, as discovery read it.
            match cgroup.and_then(|c| c.unified).filter(|p| p != "/") {
                Some(path) => {
                    let cgroup_dir = self.root.join(path.trim_start_matches('/'));
                    match fs::metadata(&cgroup_dir) {
                        Ok(m) => {
                            cgroup_ids.insert(m.ino());
                        }
                        Err(_) => {
                            pids.insert(pid);
                        }
                    }
                }
                None => {
                    pids.insert(pid);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_is_found_and_paths_resolve() {
        let Some(root) = cgroup2_mount() else {
            return; // no cgroup v2 on this host: nothing to resolve against
        };
        assert!(root.join("cgroup.procs").is_file(), "{}", root.display());
        assert_eq!(resolve_cgroup(&root, Path::new("/")).expect("root"), root);
        assert_eq!(resolve_cgroup(&root, &root).expect("absolute"), root);
        let err = resolve_cgroup(&root, Path::new("/no-such.slice")).expect_err("missing");
        assert!(err.to_string().contains("is not a cgroup v2 directory"), "{err}");
        let mut ids = HashSet::new();
        collect_cgroup_ids(&root, &mut ids);
        assert!(ids.contains(&fs::metadata(&root).expect("root").ino()));
    }
}
