//! vpc format. (Being written: see the issue tracker.)
