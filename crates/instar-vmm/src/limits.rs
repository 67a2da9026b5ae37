//! Every limit of the sandbox, with the reason for its value.

use std::time::Duration;

/// Default guest RAM. Mapped lazily (MAP_NORESERVE, touched on demand), so
/// only what the guest uses costs host memory; 512 MiB leaves room for
/// large tables (a qcow2 L1 of a multi-TiB image, a vhdx BAT) in the heap.
pub const DEFAULT_MEMORY_BYTES: u64 = 512 << 20;

/// Default wall-clock deadline of one run. `info` on a sane image takes
/// milliseconds; a minute bounds a hostile image that makes the guest spin
/// while staying far above any legitimate run.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Largest byte count of one READ call. Bounds the time of one exit (so the
/// deadline stays responsive) and the host's pread size; the guest splits
/// bigger reads.
pub const MAX_READ_BYTES: u64 = 16 << 20;

/// Largest postcard message the guest may hand over (call or response). A
/// `map` of a fragmented multi-TiB image is a few MiB; anything past this
/// is a guest bug or an attack.
pub const MAX_MESSAGE_BYTES: u64 = 64 << 20;

/// Largest guest panic text kept (the rest is cut): it becomes one line of
/// an error message.
pub const MAX_PANIC_TEXT: usize = 512;

/// Files opened for one call besides the root (vmdk extents, backing files
/// opened by the guest, data files). A twoGbMaxExtentSparse vmdk of 1 TiB
/// has 512 extents; the default fd soft limit is 1024.
pub const MAX_OPEN_FILES: usize = 512;

/// Longest path string accepted in an open call (PATH_MAX).
pub const MAX_PATH_BYTES: usize = 4096;

/// Most VM exits of one run. Each costs 25-40 us here, so this is ~10-20 s
/// of pure exits: a guest that loops on tiny reads is stopped with a clear
/// message before the deadline.
pub const MAX_EXITS: u64 = 500_000;

/// Largest report the sandbox process may send back (response plus file
/// names); equal to the message limit plus room for names.
pub const MAX_REPORT_BYTES: u64 = MAX_MESSAGE_BYTES + (4 << 20);

/// Data ranges per hole-map reply (16 bytes each encoded at most ~20):
/// 4096 keep a reply near 80 KiB, far inside the mailbox; a more
/// fragmented file takes further calls.
pub const MAX_DATA_EXTENTS: usize = 4096;

/// Largest byte count of one WRITE call: like [`MAX_READ_BYTES`], bounds
/// the time of one exit and the host's pwrite size; the guest splits
/// bigger writes.
pub const MAX_WRITE_BYTES: u64 = 16 << 20;

/// Extra VM exits allowed per MiB of [`crate::RunFiles::output_limit`] on
/// top of [`MAX_EXITS`]: a convert moves its data in batches of MiBs (one
/// read and one write exit each, plus progress), so a large image needs
/// more exits than `info` ever does, in proportion to its size. A guest
/// looping on tiny calls is still stopped long before the deadline.
pub const EXITS_PER_OUTPUT_MIB: u64 = 8;

/// Output writes queued on the sandbox's writer thread at once (each a
/// copy of at most [`MAX_WRITE_BYTES`]): two let one batch be written while
/// the guest reads the next, and bound the host memory for it.
pub const WRITES_IN_FLIGHT: usize = 2;
