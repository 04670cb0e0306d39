//! Examples and integration tests of the adaround workspace; the library is the
//! [`adaround`] crate.
#![warn(missing_docs)]
