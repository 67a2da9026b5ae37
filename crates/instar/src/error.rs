//! Every way the CLI fails, mapped to stderr text and exit code in one
//! place.

use std::process::ExitCode;

/// A failure of the CLI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CliError {
    /// A usage error: the complete stderr text (already qemu-img's).
    Usage(String),
    /// A qemu-img message: printed as `qemu-img: MSG`.
    Qemu(String),
    /// instar's own failure (sandbox, refusal, config): `instar: MSG`.
    Instar(String),
    /// A qemu-img command instar does not implement yet.
    NotImplemented(String),
}

impl CliError {
    /// The stderr text.
    pub fn text(&self) -> String {
        match self {
            CliError::Usage(t) => t.clone(),
            // qemu-img's messages may carry a hint on further lines (vhdx
            // log replay): printed as qemu-img prints them.
            CliError::Qemu(m) => format!("qemu-img: {m}\n"),
            CliError::Instar(m) => format!("instar: {}\n", one_line(m)),
            CliError::NotImplemented(c) => {
                format!("instar: the '{c}' command is not implemented yet\n")
            }
        }
    }

    /// qemu-img's exit code for it (every failure of `info` exits 1).
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(1)
    }
}

/// instar's own messages are one line, whatever their source.
fn one_line(m: &str) -> String {
    m.replace(['\n', '\r'], " ")
}
