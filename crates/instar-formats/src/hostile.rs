//! Hostile-input sweeps the format modules' tests share: cut a valid image
//! short at many lengths, or overwrite its fields with absurd values, and
//! require that the driver answers every variant with a result or an error
//! that says something, never a panic. Tests run with overflow checks on,
//! so unchecked arithmetic on image values fails here too.
//!
//! The sweeps prove robustness only; expected messages for particular
//! variants come from qemu-img and are asserted in the modules' own tests.

use crate::{FileId, Files, ImageInfo, MemFiles, Result};
use alloc::vec::Vec;
use core::ops::Range;

/// A driver's `info`.
pub(crate) type InfoFn = fn(&mut dyn Files, FileId, &str) -> Result<ImageInfo>;

/// Run `info` on `img`; an error must carry a message.
pub(crate) fn survives(info: InfoFn, img: Vec<u8>, name: &str) -> Result<ImageInfo> {
    let r = info(&mut MemFiles::new(img), 0, name);
    if let Err(e) = &r {
        assert!(!e.message.is_empty(), "{name}: error without a message");
    }
    r
}

/// Every prefix of `img` up to `dense` bytes, then each power-of-two
/// length (and its neighbours) up to the whole image. Gives how many of
/// the cut images were refused.
pub(crate) fn truncations(info: InfoFn, img: &[u8], name: &str, dense: usize) -> usize {
    let mut lens: Vec<usize> = (0..=dense.min(img.len())).collect();
    let mut at = dense.max(1).next_power_of_two();
    while at < img.len() {
        lens.extend([at - 1, at, at + 1]);
        at *= 2;
    }
    lens.push(img.len() - 1);
    lens.iter()
        .filter(|&&n| n < img.len())
        .filter(|&&n| survives(info, img[..n].to_vec(), name).is_err())
        .count()
}

/// Values that break careless arithmetic: all ones, sign bits in both byte
/// orders, the largest positive values, zero.
const ABSURD_32: [[u8; 4]; 6] = [
    [0xff; 4],
    [0x80, 0, 0, 0],
    [0, 0, 0, 0x80],
    [0x7f, 0xff, 0xff, 0xff],
    [0xff, 0xff, 0xff, 0x7f],
    [0; 4],
];
const ABSURD_64: [[u8; 8]; 5] = [
    [0xff; 8],
    [0x80, 0, 0, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0, 0, 0x80],
    [0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
    [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
];

/// Overwrite every 2-, 4- and 8-byte aligned field in `fields` with absurd
/// values, one at a time, running `fix` (checksums) before each `info`.
/// Gives how many variants were refused.
pub(crate) fn absurd_fields(
    info: InfoFn,
    img: &[u8],
    name: &str,
    fields: Range<usize>,
    fix: &dyn Fn(&mut [u8]),
) -> usize {
    let mut refused = 0;
    let mut run = |at: usize, value: &[u8]| {
        if at + value.len() > img.len() {
            return;
        }
        let mut v = img.to_vec();
        v[at..at + value.len()].copy_from_slice(value);
        fix(&mut v);
        if survives(info, v, name).is_err() {
            refused += 1;
        }
    };
    for at in fields.clone().step_by(2) {
        run(at, &[0xff, 0xff]);
    }
    for at in fields.clone().step_by(4) {
        for value in &ABSURD_32 {
            run(at, value);
        }
    }
    for at in fields.step_by(8) {
        for value in &ABSURD_64 {
            run(at, value);
        }
    }
    refused
}

/// No checksum to fix.
pub(crate) fn no_fix(_: &mut [u8]) {}
