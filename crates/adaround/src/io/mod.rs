//! Weights in and out: importing float weights, the integer and AIMET export, checkpoints,
//! and the parameter index they share.

pub(crate) mod checkpoint;
pub(crate) mod export;
pub mod import;
pub(crate) mod params;
