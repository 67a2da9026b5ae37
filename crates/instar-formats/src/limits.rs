//! Limits on what an image may make the parser do. Each is a named const
//! with its reason; a hostile-image test proves each one.
//!
//! Where qemu has the same limit (and refuses the image with its own
//! message) the const carries qemu's value so that instar refuses exactly
//! what qemu refuses. The remaining ones bound work qemu does not bound.

/// Smallest qcow2 cluster: 2^9 bytes (qemu's MIN_CLUSTER_BITS).
pub const QCOW2_MIN_CLUSTER_BITS: u32 = 9;
/// Largest qcow2 cluster: 2^21 bytes (qemu's MAX_CLUSTER_BITS); the
/// header, its extensions and the backing name all live in cluster 0, so
/// this also bounds how much of cluster 0 we ever read.
pub const QCOW2_MAX_CLUSTER_BITS: u32 = 21;
/// Widest qcow2 refcount entry: 2^6 = 64 bits (qemu refuses wider).
pub const QCOW2_MAX_REFCOUNT_ORDER: u32 = 6;
/// qemu refuses an active L1 table larger than 32 MiB (QCOW_MAX_L1_SIZE);
/// enough for 2 PiB at 64 KiB clusters.
pub const QCOW2_MAX_L1_BYTES: u64 = 32 * 1024 * 1024;
/// qemu refuses a refcount table larger than 8 MiB (QCOW_MAX_REFTABLE_SIZE).
pub const QCOW2_MAX_REFTABLE_BYTES: u64 = 8 * 1024 * 1024;
/// qemu refuses more than 65536 internal snapshots (QCOW_MAX_SNAPSHOTS).
pub const QCOW2_MAX_SNAPSHOTS: u64 = 65536;
/// qemu refuses a snapshot table whose entries add up to more than 64 MiB
/// (an average of 1 KiB per snapshot, QCOW_MAX_SNAPSHOTS_SIZE).
pub const QCOW2_MAX_SNAPSHOTS_SIZE: u64 = 1024 * QCOW2_MAX_SNAPSHOTS;
/// qemu refuses more than 1 KiB of extra data in one snapshot entry
/// (QCOW_MAX_SNAPSHOT_EXTRA_DATA).
pub const QCOW2_MAX_SNAPSHOT_EXTRA_DATA: u32 = 1024;
/// qemu refuses more than 65535 persistent bitmaps (QCOW2_MAX_BITMAPS).
pub const QCOW2_MAX_BITMAPS: u32 = 65535;
/// qemu refuses a bitmap directory above 1 KiB per bitmap
/// (QCOW2_MAX_BITMAP_DIRECTORY_SIZE = 1024 * 65535).
pub const QCOW2_MAX_BITMAP_DIRECTORY_SIZE: u64 = 1024 * QCOW2_MAX_BITMAPS as u64;
/// qemu refuses a bitmap table of more than 2^27 entries
/// (BME_MAX_TABLE_SIZE).
pub const QCOW2_MAX_BITMAP_TABLE_ENTRIES: u32 = 0x0800_0000;
/// qemu refuses a bitmap whose table addresses more than 512 MiB of
/// bitmap data (BME_MAX_PHYS_SIZE); this also bounds the table we scan.
pub const QCOW2_MAX_BITMAP_PHYS_SIZE: u64 = 0x2000_0000;
/// Bitmap names are at most 1023 bytes (BME_MAX_NAME_SIZE).
pub const QCOW2_MAX_BITMAP_NAME: u16 = 1023;
/// Bitmap granularity is 2^9 .. 2^31 bytes (BME_MIN/MAX_GRANULARITY_BITS).
pub const QCOW2_MIN_BITMAP_GRANULARITY_BITS: u8 = 9;
/// See [`QCOW2_MIN_BITMAP_GRANULARITY_BITS`].
pub const QCOW2_MAX_BITMAP_GRANULARITY_BITS: u8 = 31;
/// Backing file names are at most 1023 bytes in qcow and qcow2 (qemu's
/// 1024-byte `backing_file` buffer).
pub const MAX_BACKING_NAME: u64 = 1023;
/// qemu's backing format buffer is 16 bytes; longer names are refused.
pub const QCOW2_BACKING_FORMAT_BUF: u32 = 16;
/// A header extension can only live in cluster 0, at most 2 MiB; this is
/// the most we ever read for one (data file name, feature table).
pub const QCOW2_MAX_EXTENSION_BYTES: u64 = 1 << QCOW2_MAX_CLUSTER_BITS;
/// The qcow2 header fields beyond the 112 bytes qemu knows can be at most
/// one cluster; qemu reads and keeps them, we only skip them.
pub const QCOW2_HEADER_STRUCT_SIZE: u32 = 112;

/// QED backing file names are read into a PATH_MAX (4096) buffer.
pub const QED_MAX_BACKING_NAME: u32 = 4096;
/// QED clusters are 4 KiB .. 64 MiB (QED_MIN/MAX_CLUSTER_SIZE).
pub const QED_MIN_CLUSTER_SIZE: u32 = 4 * 1024;
/// See [`QED_MIN_CLUSTER_SIZE`].
pub const QED_MAX_CLUSTER_SIZE: u32 = 64 * 1024 * 1024;
/// QED tables are 1 .. 16 clusters (QED_MIN/MAX_TABLE_SIZE).
pub const QED_MAX_TABLE_SIZE: u32 = 16;

/// Window of the buffered reader ([`crate::bytes::Window`]) used to walk
/// tables of small records (qcow2 snapshot table, bitmap directory, header
/// extensions; dmg resource lengths): one host read per window.
pub const READ_CHUNK: usize = 64 * 1024;

/// Bytes per host read when a table whose size the image chooses is
/// streamed (qcow2 bitmap tables, vpc and vhdx BATs, the cloop offsets
/// table, parallels extension clusters and bitmap L1 tables): memory stays
/// at one chunk however large the table, up to the gigabytes qemu allows.
pub const TABLE_CHUNK: usize = 64 * 1024;

/// dmg chunk entries (40 bytes each) read per request when walking a mish
/// block: a block can declare ~100 million entries, read in 40 KiB steps.
pub const DMG_ENTRIES_PER_READ: usize = 1024;

/// dmg chunks kept for reads (40 bytes each in memory, as in qemu). qemu
/// keeps every chunk a mish block lists; a block can list ~100 million.
/// 2^21 chunks (80 MiB) cover 2 TiB in 1 MiB chunks, far beyond real
/// images; more is refused with an instar error.
pub const DMG_MAX_CHUNKS: usize = 1 << 21;

/// Dirty bitmaps remembered per parallels image (for qemu's duplicate-name
/// check). A 2 GiB extension cluster could declare millions; real images
/// have a few.
pub const PARALLELS_MAX_BITMAPS: usize = 4096;

/// Extents one VMDK image may name. qemu has no limit, but each extent is a
/// file the host must open: a 1 MiB descriptor could name ~30000. 4096
/// covers a twoGbMaxExtent disk of 8 TiB, far beyond VMDK's 2 TiB sparse
/// maximum.
pub const VMDK_MAX_EXTENTS: usize = 4096;

/// How deep VMDK sparse extents with an embedded descriptor may nest. qemu
/// recurses without a bound (an extent naming itself never ends); real
/// images nest at most once (a monolithicSparse header pointing at its own
/// descriptor).
pub const VMDK_MAX_DESC_NESTING: u32 = 8;

/// How many times over its length the VHDX log may be read while looking
/// for an active sequence. qemu's search normally reads it about twice; a
/// crafted log can make it read the log once per sector (quadratic) or loop
/// forever (an entry as long as the log brings the scan back to where it
/// started), so the scan gets a budget instead.
pub const VHDX_LOG_SCAN_PASSES: u64 = 4;

/// LUKS1 header size on disk (the 592-byte phdr).
pub const LUKS_HEADER_SIZE: usize = 592;
