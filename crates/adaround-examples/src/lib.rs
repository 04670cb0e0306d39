//! Examples and integration tests of the adaround workspace; the library is the
//! [`adaround`] crate. This crate holds what the examples share: the digits data and models
//! ([`digits`]), small SVG charts ([`svg`]) and the step benchmark ([`bench`]).
#![warn(missing_docs)]

pub mod bench;
pub mod digits;
pub mod svg;
pub mod usps;
pub mod xception;

/// The global allocator of every program built with this crate (feature `mimalloc`, on by
/// default): it keeps freed blocks for reuse, where glibc's malloc returns large ones to the
/// kernel and page-faults them in again on the next step.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The global allocator's name, for benchmark reports.
pub const ALLOCATOR: &str = if cfg!(feature = "mimalloc") {
    "mimalloc"
} else {
    "system"
};

/// Shows the driver's progress (one line per layer, `[3/15] blocks.0.sep1: ...`) on stderr:
/// `env_logger` at `info` for `adaround`, unless `RUST_LOG` says otherwise.
pub fn init_logging() {
    let env = env_logger::Env::default().default_filter_or("adaround=info");
    let _ = env_logger::Builder::from_env(env)
        .format_target(false)
        .format_timestamp_millis()
        .try_init();
}
