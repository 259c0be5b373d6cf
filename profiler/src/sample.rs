//! The kernel's outputs as the daemon works with them.
//!
//! Two sample types on purpose: [`RawSampleHeader`] (profiler-common) is the fixed-layout
//! record the kernel writes into the ring buffer, followed by `kernel_len` kernel and
//! `user_len` user frames; [`Sample`] is the normalized sample (only the valid frames, comm as
//! text, stack errors as values). [`CounterSnapshot`] is the kernel's per-CPU counters summed.
use std::sync::Mutex;

use profiler_common::{
    COUNTER_SLOTS, Counter, HEADER_BYTES, MAX_STACK_DEPTH, MAX_USER_DEPTH, RawSampleHeader, UnwindStatus,
};

/// One on-CPU sample, normalized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub ktime_ns: u64,
    pub tgid: u32,
    pub tid: u32,
    pub cpu: u32,
    /// Thread name.
    pub comm: String,
    /// Kernel instruction pointers, leaf first.
    pub kernel: Vec<u64>,
    /// User instruction pointers, leaf first.
    pub user: Vec<u64>,
    /// How the user walk ended.
    pub unwind: UnwindStatus,
    /// Negative errno of a failed kernel stack walk.
    pub kernel_err: Option<i16>,
    /// Negative errno of a failed user stack walk.
    pub user_err: Option<i16>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("ring buffer record of {got} bytes is shorter than a sample header ({HEADER_BYTES} bytes)")]
    Short { got: usize },
    #[error("record claims {kernel} kernel and {user} user frames but holds {room}")]
    Frames { kernel: usize, user: usize, room: usize },
    #[error("record has unwind status {0}, which this daemon does not know")]
    Status(u8),
}

/// Decodes one ring-buffer record: a [`RawSampleHeader`], then `kernel_len` kernel and
/// `user_len` user frames.
pub fn decode(bytes: &[u8]) -> Result<Sample, DecodeError> {
    let header_bytes = bytes
        .get(..HEADER_BYTES)
        .ok_or(DecodeError::Short { got: bytes.len() })?;
    // SAFETY: the slice holds HEADER_BYTES = size_of::<RawSampleHeader>() bytes, the header is
    // plain integers (any bit pattern is valid) and read_unaligned has no alignment requirement.
    let raw: RawSampleHeader = unsafe { header_bytes.as_ptr().cast::<RawSampleHeader>().read_unaligned() };
    let (kernel, user) = (usize::from(raw.kernel_len), usize::from(raw.user_len));
    let room = (bytes.len() - HEADER_BYTES) / 8;
    if kernel > MAX_STACK_DEPTH || user > MAX_USER_DEPTH || kernel + user > room {
        return Err(DecodeError::Frames { kernel, user, room });
    }
    let unwind = UnwindStatus::from_u8(raw.unwind_status).ok_or(DecodeError::Status(raw.unwind_status))?;
    let mut frames = bytes[HEADER_BYTES..]
        .chunks_exact(8)
        .map(|c| u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]));
    let comm_end = raw.comm.iter().position(|&b| b == 0).unwrap_or(raw.comm.len());
    Ok(Sample {
        ktime_ns: raw.ktime_ns,
        tgid: raw.tgid,
        tid: raw.tid,
        cpu: raw.cpu,
        comm: String::from_utf8_lossy(&raw.comm[..comm_end]).into_owned(),
        kernel: frames.by_ref().take(kernel).collect(),
        user: frames.take(user).collect(),
        unwind,
        kernel_err: (raw.kernel_err != 0).then_some(raw.kernel_err),
        user_err: (raw.user_err != 0).then_some(raw.user_err),
    })
}

/// The kernel's counters as last read, shared by those who report them.
#[derive(Debug, Default)]
pub struct KernelCounters(Mutex<CounterSnapshot>);

impl KernelCounters {
    pub fn get(&self) -> CounterSnapshot {
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn set(&self, counters: CounterSnapshot) {
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = counters;
    }
}

/// Sums of the per-CPU counters, indexed like [`Counter`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CounterSnapshot(pub [u64; COUNTER_SLOTS as usize]);

impl CounterSnapshot {
    pub fn get(&self, counter: Counter) -> u64 {
        self.0[counter as usize]
    }

    /// Counts since `earlier` (counters only grow).
    pub fn since(&self, earlier: &CounterSnapshot) -> CounterSnapshot {
        let mut out = [0; COUNTER_SLOTS as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = self.0[i].saturating_sub(earlier.0[i]);
        }
        CounterSnapshot(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kernel: &[u64], user: &[u64], kernel_len: u16, user_len: u16) -> Vec<u8> {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"burn");
        let header = RawSampleHeader {
            ktime_ns: 5,
            tgid: 42,
            tid: 43,
            cpu: 1,
            kernel_len,
            user_len,
            kernel_err: 0,
            user_err: -14,
            unwind_status: 3,
            _pad: [0; 3],
            comm,
        };
        // SAFETY: the header is repr(C) plain data; viewing it as bytes is sound.
        let mut bytes =
            unsafe { std::slice::from_raw_parts((&raw const header).cast::<u8>(), HEADER_BYTES) }.to_vec();
        for frame in kernel.iter().chain(user) {
            bytes.extend(frame.to_ne_bytes());
        }
        bytes
    }

    #[test]
    fn decodes_kernel_then_user_frames() {
        let bytes = record(
            &[0xffff_ffff_8100_0000, 0xffff_ffff_8100_0100],
            &[0x40_1000, 0x40_2000, 0x40_3000],
            2,
            3,
        );
        assert_eq!(bytes.len(), HEADER_BYTES + 5 * 8);
        let sample = decode(&bytes).expect("decodes");
        assert_eq!((sample.tgid, sample.tid, sample.cpu), (42, 43, 1));
        assert_eq!(sample.comm, "burn");
        assert_eq!(sample.kernel, [0xffff_ffff_8100_0000, 0xffff_ffff_8100_0100]);
        assert_eq!(sample.user, [0x40_1000, 0x40_2000, 0x40_3000]);
        assert_eq!(sample.kernel_err, None);
        assert_eq!(sample.user_err, Some(-14));
        assert_eq!(sample.unwind, UnwindStatus::NoTable);
    }

    #[test]
    fn rejects_records_that_lie_about_their_frames() {
        let bytes = record(&[1, 2], &[3], 2, 5);
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::Frames {
                kernel: 2,
                user: 5,
                room: 3
            })
        );
        let bytes = record(&[], &[], 200, 0);
        assert!(matches!(
            decode(&bytes),
            Err(DecodeError::Frames { kernel: 200, .. })
        ));
        assert_eq!(decode(&bytes[..20]), Err(DecodeError::Short { got: 20 }));
        let mut bytes = record(&[1], &[2], 1, 1);
        bytes[28] = 200;
        assert_eq!(decode(&bytes), Err(DecodeError::Status(200)));
    }
}
