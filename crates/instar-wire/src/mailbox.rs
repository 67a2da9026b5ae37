//! Guest memory layout and the mailbox through which guest and host talk.
//! Owned by the VMM/guest implementation; see docs/wire-protocol.md.
