//! Where a fused step runs: the policy behind [`Elementwise::Auto`], beside the steps that
//! use it.

use burn::tensor::backend::Backend;

use crate::Elementwise;

/// Where a fused step runs (see [`Elementwise`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Place {
    Device,
    Host,
    Resident,
}

/// Where the fused step runs for a kernel of `weights` weights whose step costs `work`
/// multiply-adds, on `device`; `resident` says whether it can run host-resident (an
/// `f32` kernel and Burn's default Adam).
pub(crate) fn place<B: Backend>(
    elementwise: Elementwise,
    device: &B::Device,
    (weights, work): (usize, usize),
    resident: bool,
) -> Place {
    let name = B::name(device);
    // `flex`, `ndarray`, and either inside a wrapper's name (`autodiff<ndarray>`).
    let (flex, ndarray) = (name.contains("flex"), name.contains("ndarray"));
    match elementwise {
        Elementwise::Auto
            if resident && (flex || ndarray || work <= Elementwise::RESIDENT_MAX_WORK) =>
        {
            Place::Resident
        }
        Elementwise::Auto if weights >= Elementwise::HOST_MIN_WEIGHTS && flex => Place::Host,
        Elementwise::Auto | Elementwise::Device => Place::Device,
        Elementwise::Resident if resident => Place::Resident,
        Elementwise::Host | Elementwise::Resident => Place::Host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where each choice runs a fused step on a CPU backend (NdArray here; the GPU rule is
    /// exercised by the Wgpu tests).
    #[test]
    fn places_fused_steps_as_documented() {
        type N = burn_ndarray::NdArray<f32>;
        let d = Default::default();
        let small = (100, 1_000);
        let large = (1 << 20, 1 << 30);
        for size in [small, large] {
            // NdArray: Auto runs host-resident whatever the size, where it can; else on the
            // device (NdArray's host round trip per step costs more than it saves).
            assert_eq!(
                place::<N>(Elementwise::Auto, &d, size, true),
                Place::Resident
            );
            assert_eq!(
                place::<N>(Elementwise::Auto, &d, size, false),
                Place::Device
            );
            assert_eq!(
                place::<N>(Elementwise::Device, &d, size, true),
                Place::Device
            );
            assert_eq!(place::<N>(Elementwise::Host, &d, size, true), Place::Host);
            assert_eq!(
                place::<N>(Elementwise::Resident, &d, size, true),
                Place::Resident
            );
            // Without Burn's default Adam or an f32 kernel, resident falls back to host.
            assert_eq!(
                place::<N>(Elementwise::Resident, &d, size, false),
                Place::Host
            );
        }
    }
}
