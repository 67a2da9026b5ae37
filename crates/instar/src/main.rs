//! instar: the qemu-img command line over a sandboxed engine.
fn main() {}
