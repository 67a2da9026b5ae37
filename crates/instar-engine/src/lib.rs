//! instar's operations as pure functions over [`Files`]: the guest calls
//! [`handle`] with the host's request and returns what it gives. `no_std` +
//! `alloc`, no I/O of its own.
#![no_std]
#![deny(missing_docs)]

extern crate alloc;

pub mod check;
pub mod compare;
pub mod convert;
pub mod info;
pub mod map;
pub mod measure;

use instar_formats::write::Sink;
use instar_formats::Files;
use instar_wire::{Request, Response};

/// Carry out one request. `sink` holds the output files of requests that
/// write (convert); other requests never touch it.
pub fn handle(files: &mut dyn Files, sink: &mut dyn Sink, request: &Request) -> Response {
    match request {
        Request::Convert {
            sources,
            target,
            outputs: _,
            sparse_size,
            snapshot,
            target_has_backing,
            max_chain_depth,
            progress,
        } => {
            let params = convert::ConvertParams {
                sources,
                target,
                sparse_size: *sparse_size,
                snapshot: snapshot.as_deref(),
                target_has_backing: *target_has_backing,
                max_chain_depth: *max_chain_depth,
                progress: *progress,
            };
            match convert::convert(files, sink, &params) {
                Ok(r) => Response::Convert(r),
                Err(e) => Response::Error(e),
            }
        }
        Request::Compare {
            format_a,
            format_b,
            filename_a,
            filename_b,
            strict,
            progress,
            max_chain_depth,
        } => Response::Compare(compare::compare(
            files,
            &compare::CompareParams {
                format_a: format_a.as_deref(),
                format_b: format_b.as_deref(),
                filename_a,
                filename_b,
                strict: *strict,
                progress: *progress,
                max_chain_depth: *max_chain_depth,
            },
        )),
        Request::Info { format, filename } => {
            match info::info(files, format.as_deref(), filename) {
                Ok(info) => Response::Info(info),
                Err(e) => Response::Error(e),
            }
        }
        Request::Map {
            format,
            filename,
            start,
            max_length,
            max_chain_depth,
            max_entries,
            human,
            split_compressed,
        } => {
            let params = map::MapParams {
                format: format.as_deref(),
                filename,
                start: *start,
                max_length: *max_length,
                max_chain_depth: *max_chain_depth,
                max_entries: *max_entries,
                human: *human,
                split_compressed: *split_compressed,
            };
            match map::map(files, &params) {
                Ok(m) => Response::Map(m),
                Err(e) => Response::Error(e),
            }
        }
        Request::Measure {
            format,
            filename,
            target,
            max_chain_depth,
        } => match measure::measure_image(
            files,
            format.as_deref(),
            filename,
            target,
            *max_chain_depth,
        ) {
            Ok(m) => Response::Measure(m),
            Err(e) => Response::Error(e),
        },
        Request::Check { format, filename } => {
            match check::check(files, format.as_deref(), filename) {
                Ok(c) => Response::Check(c),
                Err(e) => Response::Error(e),
            }
        }
    }
}
