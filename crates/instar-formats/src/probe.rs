//! Format probing and the driver table.
