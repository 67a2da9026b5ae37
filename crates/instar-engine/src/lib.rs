//! instar's operations as pure functions over [`Files`]: the guest calls
//! [`handle`] with the host's request and returns what it gives. `no_std` +
//! `alloc`, no I/O of its own.
#![no_std]
#![deny(missing_docs)]

extern crate alloc;

pub mod info;

use instar_formats::Files;
use instar_wire::{Request, Response};

/// Carry out one request.
pub fn handle(files: &mut dyn Files, request: &Request) -> Response {
    match request {
        Request::Info { format, filename } => {
            match info::info(files, format.as_deref(), filename) {
                Ok(info) => Response::Info(info),
                Err(e) => Response::Error(e),
            }
        }
    }
}
