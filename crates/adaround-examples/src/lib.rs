//! Examples and integration tests of the adaround workspace; the library is the
//! [`adaround`] crate. This crate holds what the examples share: the digits data and models
//! ([`digits`]), small SVG charts ([`svg`]) and the step benchmark ([`bench`]).
#![warn(missing_docs)]

pub mod bench;
pub mod digits;
pub mod svg;
pub mod usps;
pub mod xception;

/// Shows the driver's progress (one line per layer, `[3/15] blocks.0.sep1: ...`) on stderr:
/// `env_logger` at `info` for `adaround`, unless `RUST_LOG` says otherwise.
pub fn init_logging() {
    let env = env_logger::Env::default().default_filter_or("adaround=info");
    let _ = env_logger::Builder::from_env(env)
        .format_target(false)
        .try_init();
}
