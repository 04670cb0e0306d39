//! The examples crate's integration tests on real data and real files, in one test binary
//! (each binary compiles Burn's generic code again: one builds faster than two).

mod digits;
mod efficientnet;
mod interop;
