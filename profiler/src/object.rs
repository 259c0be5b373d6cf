//! Opening and reading ELF files the daemon does not trust: regular-file and inode checks,
//! windowed reads of large files, section bytes with a decompression bound, build ids as hex.
//! Both the unwind tables and the symbolizer read files through here.
use std::io;

use object::{Object as _, ObjectSection as _, ReadCache, ReadRef};

use crate::rootfs::{self, FilePath, OpenError};

#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("opening {0}")]
    Open(#[from] OpenError),
    #[error("reading {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("parsing {path} as ELF: {source}")]
    Parse { path: String, source: object::Error },
}

/// Why a section's bytes were not returned by [`section_bytes`].
#[derive(Debug, thiserror::Error)]
pub enum SectionError {
    #[error("it would decompress to {size} bytes, more than the {max} allowed")]
    TooLarge { size: u64, max: u64 },
    #[error("its compressed data is corrupt or in an unknown format")]
    Corrupt,
}

/// The bytes of `section`, decompressed when it is `SHF_COMPRESSED` (zlib or zstd), refusing
/// more than `max` bytes. The size the compression header claims is checked before anything
/// is decompressed, and the zstd decoder is stopped past it, so a hostile binary cannot make
/// the daemon expand a small section without bound.
pub fn section_bytes<'data, 'file, R: ReadRef<'data>>(
    section: &object::Section<'data, 'file, R>,
    max: u64,
) -> Result<std::borrow::Cow<'data, [u8]>, SectionError> {
    use std::{borrow::Cow, io::Read as _};
    let compressed = section.compressed_data().map_err(|_| SectionError::Corrupt)?;
    let size = match compressed.format {
        object::CompressionFormat::None => compressed.data.len() as u64,
        _ => compressed.uncompressed_size,
    };
    if size > max {
        return Err(SectionError::TooLarge { size, max });
    }
    match compressed.format {
        object::CompressionFormat::Zstandard => {
            let size = usize::try_from(size).map_err(|_| SectionError::Corrupt)?;
            let mut out = Vec::with_capacity(size);
            let mut input = compressed.data;
            while !input.is_empty() && out.len() < size {
                let decoder =
                    ruzstd::decoding::StreamingDecoder::new(&mut input).map_err(|_| SectionError::Corrupt)?;
                let room = (size - out.len()) as u64;
                decoder
                    .take(room + 1)
                    .read_to_end(&mut out)
                    .map_err(|_| SectionError::Corrupt)?;
            }
            if out.len() != size {
                return Err(SectionError::Corrupt);
            }
            Ok(Cow::Owned(out))
        }
        // Stored bytes, or zlib, whose decoder fills at most the claimed size.
        _ => compressed.decompress().map_err(|_| SectionError::Corrupt),
    }
}

/// Files up to this size are read whole (one read); larger ones are read piecewise on demand
/// through a [`WindowedFile`]: headers, string and symbol tables, `.gopclntab` and DWARF
/// sections, each in one read, and nothing else. Most of an executable is code, which
/// symbolization never reads, and a debug file whose DWARF is over budget is read only for
/// its headers and symbol table, so reading piecewise copies less, faults fewer fresh pages
/// and keeps the daemon's memory bounded.
pub const READ_WHOLE_MAX: u64 = 256 * 1024;

/// Bytes a [`WindowedFile`] reads at once for small reads.
const READ_WINDOW: usize = 64 * 1024;

/// A file read for `object::ReadCache`: seeks cost nothing, and small reads are served from a
/// 64 KiB window read with one `pread`. `ReadCache` seeks and reads once per symbol name;
/// straight on a `File` that was two syscalls per name (~50,000 to parse the daemon's own
/// 17.6 MiB binary), through the window it is one per 64 KiB of string table. Reads of a
/// window or more go straight to the file.
#[derive(Debug)]
pub struct WindowedFile {
    file: std::fs::File,
    len: u64,
    pos: u64,
    window_start: u64,
    window: Vec<u8>,
}

impl WindowedFile {
    pub fn new(file: std::fs::File, len: u64) -> Self {
        Self {
            file,
            len,
            pos: 0,
            window_start: 0,
            window: Vec::new(),
        }
    }

    /// A `ReadCache` over `file` whose length is `len`.
    pub fn cache(file: std::fs::File, len: u64) -> ReadCache<Self> {
        ReadCache::new(Self::new(file, len))
    }
}

impl std::io::Read for WindowedFile {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt as _;
        if buf.len() >= READ_WINDOW {
            let n = self.file.read_at(buf, self.pos)?;
            self.pos += n as u64;
            return Ok(n);
        }
        let end = self.window_start + self.window.len() as u64;
        if self.pos < self.window_start || self.pos >= end {
            self.window.resize(READ_WINDOW, 0);
            let n = self.file.read_at(&mut self.window, self.pos)?;
            self.window.truncate(n);
            self.window_start = self.pos;
            if n == 0 {
                return Ok(0);
            }
        }
        let at = (self.pos - self.window_start) as usize;
        let n = buf.len().min(self.window.len() - at);
        buf[..n].copy_from_slice(&self.window[at..at + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl std::io::Seek for WindowedFile {
    fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
        let target = match to {
            std::io::SeekFrom::Start(at) => Some(at),
            std::io::SeekFrom::End(delta) => self.len.checked_add_signed(delta),
            std::io::SeekFrom::Current(delta) => self.pos.checked_add_signed(delta),
        };
        let target = target.ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        self.pos = target;
        Ok(target)
    }
}

/// Most bytes of one string table [`LargeFile`] reads whole.
const STRING_TABLE_MAX: u64 = 64 * 1024 * 1024;

/// A file too large to read whole, read for `object` through a [`WindowedFile`], except its
/// symbol string tables (`.strtab`, `.dynstr`), which are read whole up front. The symbol
/// pass asks for one name at a time, and `ReadCache` answers each with a hash-map entry and an
/// allocation of its own: for the daemon's own binary that was ~50,000 of them, three
/// quarters of its 20 ms parse.
pub struct LargeFile {
    cache: ReadCache<WindowedFile>,
    /// (file offset, bytes) of each string table read whole.
    strings: Vec<(u64, Vec<u8>)>,
}

impl LargeFile {
    pub fn open(file: std::fs::File, len: u64) -> Self {
        let cache = WindowedFile::cache(file, len);
        let ranges: Vec<(u64, u64)> = match object::File::parse(&cache) {
            Ok(elf) => [".strtab", ".dynstr"]
                .into_iter()
                .filter_map(|name| elf.section_by_name(name)?.file_range())
                .filter(|&(offset, size)| {
                    size <= STRING_TABLE_MAX && offset.checked_add(size).is_some_and(|end| end <= len)
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        let windowed = cache.into_inner();
        let strings = ranges
            .into_iter()
            .filter_map(|(offset, size)| {
                use std::os::unix::fs::FileExt as _;
                let mut bytes = vec![0; usize::try_from(size).ok()?];
                windowed.file.read_exact_at(&mut bytes, offset).ok()?;
                Some((offset, bytes))
            })
            .collect();
        Self {
            cache: ReadCache::new(windowed),
            strings,
        }
    }

    /// The string table holding file offset `at`, with its own offset.
    fn strings_at(&self, at: u64) -> Option<(u64, &[u8])> {
        self.strings
            .iter()
            .find(|(offset, bytes)| at >= *offset && at - offset < bytes.len() as u64)
            .map(|(offset, bytes)| (*offset, bytes.as_slice()))
    }
}

/// A `PT_LOAD` segment: where file bytes land in the ELF's virtual address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadSegment {
    pub vaddr: u64,
    pub mem_size: u64,
    pub file_offset: u64,
    pub file_size: u64,
}

/// Opens `at` for reading through [`rootfs::open`]: inside the process's root, never
/// blocking, a regular file only and, with `inode`, that inode (a path seen in
/// /proc/<pid>/maps may since have been replaced).
pub fn open_regular(
    at: &FilePath,
    inode: Option<u64>,
) -> Result<(std::fs::File, std::fs::Metadata), ElfError> {
    Ok(rootfs::open(at, inode)?)
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

impl<'a> ReadRef<'a> for &'a LargeFile {
    fn len(self) -> Result<u64, ()> {
        (&self.cache).len()
    }

    fn read_bytes_at(self, offset: u64, size: u64) -> Result<&'a [u8], ()> {
        if let Some((start, bytes)) = self.strings_at(offset) {
            let from = (offset - start) as usize;
            if let Some(slice) = usize::try_from(size)
                .ok()
                .and_then(|n| bytes.get(from..from.checked_add(n)?))
            {
                return Ok(slice);
            }
        }
        (&self.cache).read_bytes_at(offset, size)
    }

    fn read_bytes_at_until(self, range: std::ops::Range<u64>, delimiter: u8) -> Result<&'a [u8], ()> {
        if let Some((start, bytes)) = self.strings_at(range.start) {
            let from = (range.start - start) as usize;
            let to = range.end.saturating_sub(start).min(bytes.len() as u64) as usize;
            let slice = bytes.get(from..to).ok_or(())?;
            if let Some(end) = slice.iter().position(|&b| b == delimiter) {
                return Ok(&slice[..end]);
            }
            if range.end <= start + bytes.len() as u64 {
                return Err(());
            }
        }
        (&self.cache).read_bytes_at_until(range, delimiter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_fifos_and_replaced_files_without_blocking() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().expect("utf8")).expect("cstring");
        // SAFETY: mkfifo reads a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = open_regular(&FilePath::Trusted(fifo), None).expect_err("a FIFO is not a regular file");
        assert!(err.to_string().contains("not a regular file"), "{err}");

        let exe = FilePath::Trusted("/proc/self/exe".into());
        let err = open_regular(&exe, Some(1)).expect_err("wrong inode");
        assert!(err.to_string().contains("replaced since"), "{err}");
    }

    #[test]
    fn windowed_reads_equal_the_file() {
        use std::io::{Read as _, Seek as _, SeekFrom};
        let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("data");
        std::fs::write(&path, &bytes).expect("write");
        let file = std::fs::File::open(&path).expect("open");
        let mut w = WindowedFile::new(file, bytes.len() as u64);
        // Small reads inside and across windows, a large read past the window, the end.
        for (at, size) in [
            (0usize, 10usize),
            (5, 300),
            (65_530, 20),
            (70_000, 100_000),
            (299_990, 10),
        ] {
            assert_eq!(w.seek(SeekFrom::Start(at as u64)).expect("seek"), at as u64);
            let mut buf = vec![0u8; size];
            w.read_exact(&mut buf).expect("read");
            assert_eq!(buf, bytes[at..at + size], "{at}+{size}");
        }
        let mut rest = Vec::new();
        w.seek(SeekFrom::End(-5)).expect("seek from end");
        w.read_to_end(&mut rest).expect("read to end");
        assert_eq!(rest, bytes[bytes.len() - 5..]);
        assert!(w.seek(SeekFrom::Current(-1_000_000)).is_err());

        // A real ELF file's string tables are read whole up front.
        let exe = std::env::current_exe().expect("test binary");
        let file = std::fs::File::open(&exe).expect("open test binary");
        let len = file.metadata().expect("metadata").len();
        let large = LargeFile::open(file, len);
        assert!(!large.strings.is_empty(), "no string table was read whole");
    }

    #[test]
    fn large_file_reads_equal_the_file() {
        let mut bytes: Vec<u8> = (0..4000u32).map(|i| b'a' + (i % 26) as u8).collect();
        for at in [150, 250, 1000] {
            bytes[at] = 0;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("strings");
        std::fs::write(&path, &bytes).expect("write");
        let file = std::fs::File::open(&path).expect("open");
        let large = LargeFile {
            cache: WindowedFile::cache(file, bytes.len() as u64),
            strings: vec![(100, bytes[100..200].to_vec())],
        };
        let whole = bytes.as_slice();
        for range in [
            100..4000,
            120..4000,
            199..4000,
            160..4000,
            120..130,
            160..200,
            160..260,
        ] {
            assert_eq!(
                (&large).read_bytes_at_until(range.clone(), 0),
                whole.read_bytes_at_until(range.clone(), 0),
                "{range:?}"
            );
        }
        for (offset, size) in [(100, 100), (150, 60), (199, 1), (0, 150), (300, 10), (120, 0)] {
            assert_eq!(
                (&large).read_bytes_at(offset, size),
                whole.read_bytes_at(offset, size),
                "{offset}+{size}"
            );
        }
        assert_eq!((&large).len(), Ok(4000));
    }
}
