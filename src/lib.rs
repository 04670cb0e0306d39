//! Examples and integration tests of the adaround workspace; the library is the
//! [`adaround`] crate. This crate holds what the examples share: the digits data and models
//! ([`digits`]) and small SVG charts ([`svg`]).
#![warn(missing_docs)]

pub mod digits;
pub mod svg;
