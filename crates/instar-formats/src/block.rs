//! qemu's generic block-layer rules that every driver's open passes
//! through: the bounds every read request is checked against, the sector
//! count checks after open, and how an errno becomes message text. Each
//! driver decides when it asks; the wording and arithmetic live here once.

use crate::Result;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use instar_wire::{ChildFile, FileId, ImageError};

/// qemu's sector size: the unit of `total_sectors`.
pub(crate) const SECTOR: u64 = 512;

/// BDRV_MAX_LENGTH: INT64_MAX aligned down to 1 GiB. A request ending past
/// it fails with EIO before any driver sees it.
pub(crate) const BDRV_MAX_LENGTH: u64 = (i64::MAX as u64) & !((1u64 << 30) - 1);

/// BDRV_REQUEST_MAX_BYTES: INT_MAX aligned down to a sector. One read larger
/// than this fails with EIO (qemu's request counts are ints).
pub(crate) const BDRV_REQUEST_MAX_BYTES: u64 = ((i32::MAX as u64) >> 9) << 9;

/// The errno values the rules below can produce.
pub(crate) const EIO: i32 = 5;
/// Invalid argument.
pub(crate) const EINVAL: i32 = 22;
/// File too large.
pub(crate) const EFBIG: i32 = 27;
/// Operation not supported.
pub(crate) const ENOTSUP: i32 = 95;

/// The child list of a format that lives in one file.
pub(crate) fn single_child(file: FileId) -> alloc::vec::Vec<ChildFile> {
    vec![ChildFile {
        name: "file".into(),
        file,
        counts_in_disk_size: true,
    }]
}

/// qemu's request check (bdrv_check_request32) for a read of `bytes` at
/// `offset`, both as qemu holds them (signed 64-bit). `Err(EIO)` when qemu
/// would refuse the read; reads past the end of the file are fine (zeros).
pub(crate) fn check_read(offset: i64, bytes: u64) -> core::result::Result<(), i32> {
    // A negative offset lands above i64::MAX, which request_fails refuses.
    if request_fails(offset as u64, bytes) || bytes > BDRV_REQUEST_MAX_BYTES {
        return Err(EIO);
    }
    Ok(())
}

/// qemu's 64-bit request check (bdrv_check_request) for a read of `bytes`
/// at `offset`: true when the offset is negative as an int64 or the request
/// reaches past [`BDRV_MAX_LENGTH`]. Unlike [`check_read`] it does not bound
/// the request to [`BDRV_REQUEST_MAX_BYTES`].
pub(crate) fn request_fails(offset: u64, bytes: u64) -> bool {
    offset > i64::MAX as u64 || bytes > BDRV_MAX_LENGTH || offset > BDRV_MAX_LENGTH - bytes
}

/// An open failure whose driver set no message: qemu's block layer then
/// words it as `Could not open 'F': <strerror>`, nested in qemu-img's own
/// `Could not open 'F': ` prefix.
pub(crate) fn open_errno(filename: &str, errno: i32) -> ImageError {
    ImageError::open(format!("Could not open '{filename}': {}", strerror(errno)))
}

/// `error_setg_errno`: `msg: strerror`, or `msg` alone for errno 0.
pub(crate) fn with_errno(msg: &str, errno: i32) -> String {
    if errno == 0 {
        String::from(msg)
    } else {
        format!("{msg}: {}", strerror(errno))
    }
}

/// The errno qemu reports for a negative 64-bit return value `ret`: qemu
/// passes `-ret` to an `int` parameter, keeping the low 32 bits.
pub(crate) fn errno_of(ret: i64) -> i32 {
    ret.wrapping_neg() as i32
}

/// After a driver that sets `total_sectors` opens, qemu's block layer
/// checks the count (bdrv_refresh_total_sectors: the byte size, computed in
/// wrapping unsigned 64-bit arithmetic, must not pass BDRV_MAX_LENGTH), and
/// `info` then asks for the length (bdrv_getlength: negative counts are
/// returned as errors, counts whose byte size overflows give EFBIG).
/// Returns the virtual size in bytes or qemu's exact error.
pub(crate) fn virtual_size(total_sectors: i64, filename: &str) -> Result<u64> {
    if (total_sectors as u64).wrapping_mul(SECTOR) > BDRV_MAX_LENGTH {
        return Err(ImageError::open(with_errno(
            "Could not refresh total sector count",
            EFBIG,
        )));
    }
    length(total_sectors).map_err(|errno| {
        ImageError::operation(with_errno(
            &format!("Can't get image size '{filename}'"),
            errno,
        ))
    })
}

/// bdrv_getlength of a node with `total_sectors`: bytes, or the errno.
pub(crate) fn length(total_sectors: i64) -> core::result::Result<u64, i32> {
    if total_sectors < 0 {
        return Err(errno_of(total_sectors));
    }
    if total_sectors as u64 > (i64::MAX as u64) / SECTOR {
        return Err(EFBIG);
    }
    Ok(total_sectors as u64 * SECTOR)
}

/// glibc's strerror text for Linux errno values (what qemu prints).
pub(crate) fn strerror(errno: i32) -> String {
    let text = match errno {
        0 => "Success",
        1 => "Operation not permitted",
        2 => "No such file or directory",
        3 => "No such process",
        4 => "Interrupted system call",
        5 => "Input/output error",
        6 => "No such device or address",
        7 => "Argument list too long",
        8 => "Exec format error",
        9 => "Bad file descriptor",
        10 => "No child processes",
        11 => "Resource temporarily unavailable",
        12 => "Cannot allocate memory",
        13 => "Permission denied",
        14 => "Bad address",
        15 => "Block device required",
        16 => "Device or resource busy",
        17 => "File exists",
        18 => "Invalid cross-device link",
        19 => "No such device",
        20 => "Not a directory",
        21 => "Is a directory",
        22 => "Invalid argument",
        23 => "Too many open files in system",
        24 => "Too many open files",
        25 => "Inappropriate ioctl for device",
        26 => "Text file busy",
        27 => "File too large",
        28 => "No space left on device",
        29 => "Illegal seek",
        30 => "Read-only file system",
        31 => "Too many links",
        32 => "Broken pipe",
        33 => "Numerical argument out of domain",
        34 => "Numerical result out of range",
        35 => "Resource deadlock avoided",
        36 => "File name too long",
        37 => "No locks available",
        38 => "Function not implemented",
        39 => "Directory not empty",
        40 => "Too many levels of symbolic links",
        42 => "No message of desired type",
        43 => "Identifier removed",
        44 => "Channel number out of range",
        45 => "Level 2 not synchronized",
        46 => "Level 3 halted",
        47 => "Level 3 reset",
        48 => "Link number out of range",
        49 => "Protocol driver not attached",
        50 => "No CSI structure available",
        51 => "Level 2 halted",
        52 => "Invalid exchange",
        53 => "Invalid request descriptor",
        54 => "Exchange full",
        55 => "No anode",
        56 => "Invalid request code",
        57 => "Invalid slot",
        59 => "Bad font file format",
        60 => "Device not a stream",
        61 => "No data available",
        62 => "Timer expired",
        63 => "Out of streams resources",
        64 => "Machine is not on the network",
        65 => "Package not installed",
        66 => "Object is remote",
        67 => "Link has been severed",
        68 => "Advertise error",
        69 => "Srmount error",
        70 => "Communication error on send",
        71 => "Protocol error",
        72 => "Multihop attempted",
        73 => "RFS specific error",
        74 => "Bad message",
        75 => "Value too large for defined data type",
        76 => "Name not unique on network",
        77 => "File descriptor in bad state",
        78 => "Remote address changed",
        79 => "Can not access a needed shared library",
        80 => "Accessing a corrupted shared library",
        81 => ".lib section in a.out corrupted",
        82 => "Attempting to link in too many shared libraries",
        83 => "Cannot exec a shared library directly",
        84 => "Invalid or incomplete multibyte or wide character",
        85 => "Interrupted system call should be restarted",
        86 => "Streams pipe error",
        87 => "Too many users",
        88 => "Socket operation on non-socket",
        89 => "Destination address required",
        90 => "Message too long",
        91 => "Protocol wrong type for socket",
        92 => "Protocol not available",
        93 => "Protocol not supported",
        94 => "Socket type not supported",
        95 => "Operation not supported",
        96 => "Protocol family not supported",
        97 => "Address family not supported by protocol",
        98 => "Address already in use",
        99 => "Cannot assign requested address",
        100 => "Network is down",
        101 => "Network is unreachable",
        102 => "Network dropped connection on reset",
        103 => "Software caused connection abort",
        104 => "Connection reset by peer",
        105 => "No buffer space available",
        106 => "Transport endpoint is already connected",
        107 => "Transport endpoint is not connected",
        108 => "Cannot send after transport endpoint shutdown",
        109 => "Too many references: cannot splice",
        110 => "Connection timed out",
        111 => "Connection refused",
        112 => "Host is down",
        113 => "No route to host",
        114 => "Operation already in progress",
        115 => "Operation now in progress",
        116 => "Stale file handle",
        117 => "Structure needs cleaning",
        118 => "Not a XENIX named type file",
        119 => "No XENIX semaphores available",
        120 => "Is a named type file",
        121 => "Remote I/O error",
        122 => "Disk quota exceeded",
        123 => "No medium found",
        124 => "Wrong medium type",
        125 => "Operation canceled",
        126 => "Required key not available",
        127 => "Key has expired",
        128 => "Key has been revoked",
        129 => "Key was rejected by service",
        130 => "Owner died",
        131 => "State not recoverable",
        132 => "Operation not possible due to RF-kill",
        133 => "Memory page has hardware error",
        _ => return format!("Unknown error {errno}"),
    };
    String::from(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_bounds() {
        assert_eq!(check_read(0, 512), Ok(()));
        assert_eq!(check_read(-1, 1), Err(EIO));
        assert_eq!(check_read(0, BDRV_REQUEST_MAX_BYTES), Ok(()));
        assert_eq!(check_read(0, BDRV_REQUEST_MAX_BYTES + 1), Err(EIO));
        assert_eq!(check_read((BDRV_MAX_LENGTH - 512) as i64, 512), Ok(()));
        assert_eq!(check_read((BDRV_MAX_LENGTH - 512) as i64, 513), Err(EIO));
        assert_eq!(check_read(i64::MAX, 0), Err(EIO));
    }

    #[test]
    fn sector_count_rules() {
        // Messages from qemu-img 10.0.2 on parallels images with these
        // nb_sectors values.
        assert_eq!(virtual_size(4096, "p").unwrap(), 2097152);
        let e = virtual_size(1 << 54, "p8c").unwrap_err();
        assert_eq!(
            e.message,
            "Could not refresh total sector count: File too large"
        );
        let e = virtual_size((1 << 54) - 1, "p8d").unwrap_err();
        assert_eq!(
            e.message,
            "Could not refresh total sector count: File too large"
        );
        let e = virtual_size(1 << 62, "p8").unwrap_err();
        assert_eq!(e.kind, instar_wire::ErrorKind::Operation);
        assert_eq!(e.message, "Can't get image size 'p8': File too large");
        let e = virtual_size(i64::MIN, "p8b").unwrap_err();
        assert_eq!(e.message, "Can't get image size 'p8b'");
        // Negative counts whose byte size wraps low pass the first check;
        // qemu then prints the low 32 bits of the count as an errno.
        let e = virtual_size(-1, "n1").unwrap_err();
        assert_eq!(
            e.message,
            "Could not refresh total sector count: File too large"
        );
        let e = virtual_size(0xFF80_0000_0000_0001u64 as i64, "n2").unwrap_err();
        assert_eq!(e.message, "Can't get image size 'n2': Unknown error -1");
        let e = virtual_size(0xFF80_0000_0000_000Bu64 as i64, "n4").unwrap_err();
        assert_eq!(e.message, "Can't get image size 'n4': Unknown error -11");
    }

    #[test]
    fn errno_texts() {
        assert_eq!(strerror(5), "Input/output error");
        assert_eq!(strerror(22), "Invalid argument");
        assert_eq!(strerror(41), "Unknown error 41");
        assert_eq!(strerror(-3), "Unknown error -3");
    }
}
