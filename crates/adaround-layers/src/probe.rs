//! Observation points inside the quantized layers, armed by a driver.
//!
//! A driver that needs what flows through the layers of a user's model (the AdaRound driver
//! does) installs a [`Probe`] on the current thread and runs the model's own `forward`. Each
//! quantized layer and activation then reports, in forward order, an event numbered by its
//! position in that forward pass: a copy of the layer and its input and output. The probe
//! can also switch every layer to its float weights (`float_mode`) and stop the forward pass
//! early once it has what it needs. With no probe installed, the layers only pay for one
//! thread-local lookup per forward.

use std::{any::Any, cell::RefCell, marker::PhantomData};

use burn::tensor::{backend::Backend, Tensor};

use crate::{QuantizedLayer, QuantizedReLU};

/// A tensor flowing between layers: rows `[n, features]` (Dense inputs of any rank are
/// flattened to rows) or feature maps `[batch, channels, height, width]`.
#[derive(Clone, Debug)]
pub enum Flow<B: Backend> {
    /// `[n, features]`.
    Rows(Tensor<B, 2>),
    /// `[batch, channels, height, width]`.
    Maps(Tensor<B, 4>),
}

impl<B: Backend> Flow<B> {
    /// The shape of the tensor.
    pub fn dims(&self) -> Vec<usize> {
        match self {
            Self::Rows(t) => t.dims().to_vec(),
            Self::Maps(t) => t.dims().to_vec(),
        }
    }

    /// Detaches the tensor from any autodiff graph.
    pub fn detach(self) -> Self {
        self.map(|t| t.detach(), |t| t.detach())
    }

    /// Applies `rows` or `maps` to the tensor.
    pub fn map(
        self,
        rows: impl FnOnce(Tensor<B, 2>) -> Tensor<B, 2>,
        maps: impl FnOnce(Tensor<B, 4>) -> Tensor<B, 4>,
    ) -> Self {
        match self {
            Self::Rows(t) => Self::Rows(rows(t)),
            Self::Maps(t) => Self::Maps(maps(t)),
        }
    }

    /// The tensor flattened to rank 1.
    pub fn flatten(self) -> Tensor<B, 1> {
        match self {
            Self::Rows(t) => t.flatten(0, 1),
            Self::Maps(t) => t.flatten(0, 3),
        }
    }

    /// Number of elements.
    pub fn num_elements(&self) -> usize {
        self.dims().iter().product()
    }
}

/// What a layer reports to a probe.
#[allow(clippy::large_enum_variant)] // Burn modules are held by value (as burn-nn's `Activation`); tensors inside are shared handles
#[derive(Clone, Debug)]
pub enum ProbeEvent<B: Backend> {
    /// A quantized neural layer ran.
    Layer {
        /// A copy of the layer (its tensors are shared, not copied).
        layer: QuantizedLayer<B>,
        /// Its input.
        input: Flow<B>,
        /// Its output.
        output: Flow<B>,
    },
    /// A quantized activation ran.
    Activation {
        /// A copy of the activation.
        activation: QuantizedReLU<B>,
        /// Its input.
        input: Flow<B>,
        /// Its output.
        output: Flow<B>,
    },
}

/// What the forward pass does after a probe took an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeAction {
    /// Go on.
    Continue,
    /// Stop the forward pass now (it unwinds with a [`StopForward`] payload, which
    /// [`run_with_probe`] turns into [`ProbeRun::Stopped`]).
    Stop,
}

/// A driver's view of a forward pass.
pub trait Probe<B: Backend>: Any {
    /// Whether the layers use float weights and float activations.
    fn float_mode(&self) -> bool {
        false
    }
    /// Whether quantized activations run in float; by default as [`Self::float_mode`]. A
    /// probe that hands the layers other float weights (soft ones, under optimisation) keeps
    /// the activations quantized.
    fn float_activations(&self) -> bool {
        self.float_mode()
    }
    /// Whether the event at `index` (0-based, in forward order) is wanted; the layer only
    /// builds the event when it is.
    fn wants(&self, index: usize) -> bool;
    /// Takes the event at `index`.
    fn record(&mut self, index: usize, event: ProbeEvent<B>) -> ProbeAction;
}

/// The unwinding payload of a forward pass stopped by a probe.
#[derive(Debug)]
pub struct StopForward;

/// How a forward pass under a probe ended.
pub enum ProbeRun<R> {
    /// It returned.
    Completed(R),
    /// The probe stopped it.
    Stopped,
    /// It panicked (a shape mismatch in the user's model, say); the message.
    Panicked(String),
}

struct Installed<B: Backend> {
    probe: Box<dyn Probe<B>>,
    counter: usize,
}

thread_local! {
    static PROBE: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
}

/// Runs `forward` with `probe` installed on this thread, and gives the probe back.
///
/// Panics inside `forward` are caught and returned as [`ProbeRun::Panicked`]; a stop
/// requested by the probe as [`ProbeRun::Stopped`].
///
/// # Panics
/// If a probe is already installed on this thread.
pub fn run_with_probe<B: Backend, P: Probe<B>, R>(
    probe: P,
    forward: impl FnOnce() -> R,
) -> (P, ProbeRun<R>) {
    PROBE.with(|cell| {
        let mut slot = cell.borrow_mut();
        assert!(
            slot.is_none(),
            "a probe is already installed on this thread"
        );
        let installed = Installed::<B> {
            probe: Box::new(probe),
            counter: 0,
        };
        *slot = Some(Box::new(installed));
    });
    struct Uninstall<B>(PhantomData<B>);
    impl<B> Drop for Uninstall<B> {
        fn drop(&mut self) {
            // Runs on unwinding as well: the probe never outlives the call.
            let _ = PROBE.try_with(|cell| cell.borrow_mut().take());
        }
    }
    let guard = Uninstall::<B>(PhantomData);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(forward));
    let installed = PROBE
        .with(|cell| cell.borrow_mut().take())
        .expect("the probe is installed");
    drop(guard);
    let installed = installed
        .downcast::<Installed<B>>()
        .expect("the probe keeps its backend");
    let probe: Box<dyn Any> = installed.probe;
    let probe = *probe
        .downcast::<P>()
        .unwrap_or_else(|_| unreachable!("the probe keeps its type"));
    let run = match result {
        Ok(r) => ProbeRun::Completed(r),
        Err(payload) if payload.is::<StopForward>() => ProbeRun::Stopped,
        Err(payload) => ProbeRun::Panicked(panic_message(payload.as_ref())),
    };
    (probe, run)
}

/// The message of a panic payload.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

fn with_installed<B: Backend, R>(f: impl FnOnce(&mut Installed<B>) -> R) -> Option<R> {
    PROBE.with(|cell| {
        let mut slot = cell.borrow_mut();
        let installed = slot.as_mut()?.downcast_mut::<Installed<B>>()?;
        Some(f(installed))
    })
}

/// Whether a probe on this thread asks layers of backend `B` to use float weights.
pub fn float_mode<B: Backend>() -> bool {
    with_installed::<B, _>(|i| i.probe.float_mode()).unwrap_or(false)
}

/// Whether a probe on this thread asks quantized activations of backend `B` to run in float.
pub fn float_activations<B: Backend>() -> bool {
    with_installed::<B, _>(|i| i.probe.float_activations()).unwrap_or(false)
}

/// Reports an event to the probe of backend `B`, if one is installed and wants it.
/// `make` builds the event only when it is wanted.
pub(crate) fn observe<B: Backend>(make: impl FnOnce() -> ProbeEvent<B>) {
    let action = with_installed::<B, _>(|installed| {
        let index = installed.counter;
        installed.counter += 1;
        if installed.probe.wants(index) {
            installed.probe.record(index, make())
        } else {
            ProbeAction::Continue
        }
    });
    if action == Some(ProbeAction::Stop) {
        std::panic::resume_unwind(Box::new(StopForward));
    }
}
