//! qcow2 format. (Being written: see the issue tracker.)
