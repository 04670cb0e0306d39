//! Examples and integration tests of the adaround workspace; the library is the
//! [`adaround`] crate. This crate holds what the examples share: the digits data and models
//! ([`digits`]), small SVG charts ([`svg`]) and the step benchmark ([`bench`]).
#![warn(missing_docs)]

pub mod bench;
pub mod digits;
pub mod svg;
pub mod xception;
