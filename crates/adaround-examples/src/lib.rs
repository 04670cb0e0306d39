//! Examples and integration tests of the adaround workspace; the library is the
//! [`adaround`] crate. This crate holds what the examples share: the digits data and models
//! ([`digits`]), small SVG charts ([`svg`]) and the step benchmark ([`bench`]).
#![warn(missing_docs)]

pub mod bench;
pub mod digits;
pub mod efficientnet;
pub mod svg;
pub mod usps;
pub mod xception;

/// A tensor as `{"shape": [..], "values": [..]}` (f32, row-major): how the examples write
/// float models for the Python side-by-side scripts.
pub fn tensor_json<B: burn::tensor::backend::Backend, const D: usize>(
    t: burn::tensor::Tensor<B, D>,
) -> serde_json::Value {
    let data = t.into_data().convert::<f32>();
    serde_json::json!({ "shape": data.shape, "values": data.to_vec::<f32>().expect("f32 values") })
}

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

#[cfg(test)]
mod tests {
    use burn::tensor::Tensor;

    type B = burn_ndarray::NdArray<f32>;

    #[test]
    fn should_write_a_tensor_row_major_with_its_shape() {
        let t =
            Tensor::<B, 2>::from_floats([[1.0, 2.0, 3.0], [4.0, 5.5, -6.0]], &Default::default());
        let json = super::tensor_json(t.transpose());
        assert_eq!(json["shape"]["dims"], serde_json::json!([3, 2]));
        assert_eq!(
            json["values"],
            serde_json::json!([1.0, 4.0, 2.0, 5.5, 3.0, -6.0])
        );
    }
}
