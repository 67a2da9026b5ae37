//! Limits on what an image may make the parser do. Each is a named const
//! with its reason; a hostile-image test proves each one.
