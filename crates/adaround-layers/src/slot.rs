use adaround_core::{AdaRoundQuantizer, AdaRoundQuantizerRecord, WeightQuantizer};
use burn::{
    module::{
        AutodiffModule, Content, Devices, Module, ModuleDisplay, ModuleDisplayDefault,
        ModuleMapper, ModuleVisitor,
    },
    record::Record,
    tensor::{
        backend::{AutodiffBackend, Backend},
        Tensor,
    },
};

/// The quantizer of one kernel: a plain [`WeightQuantizer`] (the float pass-through included)
/// or an [`AdaRoundQuantizer`] that wraps one.
///
/// A layer applies its slot to the kernel on every forward. Swapping what the slot holds
/// never touches the layer's float weights. The slot is saved with the layer's record,
/// whatever it holds, and loads back as it was saved.
#[allow(clippy::large_enum_variant)] // Burn modules are held by value (as burn-nn's `Activation`); tensors inside are shared handles
#[derive(Clone, Debug)]
pub enum QuantizerSlot<B: Backend> {
    /// A plain quantizer, applied to the float kernel.
    Plain(WeightQuantizer),
    /// AdaRound: the kernel is replaced by its reconstructed weights.
    AdaRound(AdaRoundQuantizer<B>),
}

impl<B: Backend> QuantizerSlot<B> {
    /// Applies the slot to `weights` (output channels at `axis`).
    ///
    /// A plain quantizer quantizes `weights`; AdaRound ignores them and returns its own
    /// reconstructed weights (soft in training mode, quantized in evaluation mode).
    pub fn apply<const D: usize>(&self, weights: Tensor<B, D>, axis: usize) -> Tensor<B, D> {
        match self {
            Self::Plain(q) => q.quantize(weights, axis),
            Self::AdaRound(ada) => ada.quantize(),
        }
    }

    /// The original quantizer (the one AdaRound wraps, if AdaRound is in the slot).
    pub fn quantizer(&self) -> &WeightQuantizer {
        match self {
            Self::Plain(q) => q,
            Self::AdaRound(ada) => &ada.quantizer,
        }
    }

    /// The AdaRound quantizer, if the slot holds one.
    pub fn adaround(&self) -> Option<&AdaRoundQuantizer<B>> {
        match self {
            Self::Plain(_) => None,
            Self::AdaRound(ada) => Some(ada),
        }
    }
}

impl<B: Backend> From<WeightQuantizer> for QuantizerSlot<B> {
    fn from(q: WeightQuantizer) -> Self {
        Self::Plain(q)
    }
}

impl<B: Backend> From<AdaRoundQuantizer<B>> for QuantizerSlot<B> {
    fn from(ada: AdaRoundQuantizer<B>) -> Self {
        Self::AdaRound(ada)
    }
}

/// The record of a [`QuantizerSlot`].
#[allow(clippy::large_enum_variant)] // Burn modules are held by value (as burn-nn's `Activation`); tensors inside are shared handles
#[derive(Record)]
pub enum QuantizerSlotRecord<B: Backend> {
    /// A plain quantizer.
    Plain(WeightQuantizer),
    /// An AdaRound quantizer with its state.
    AdaRound(AdaRoundQuantizerRecord<B>),
}

impl<B: Backend> Module<B> for QuantizerSlot<B> {
    type Record = QuantizerSlotRecord<B>;

    fn visit<V: ModuleVisitor<B>>(&self, visitor: &mut V) {
        if let Self::AdaRound(ada) = self {
            visitor.enter_module("adaround", "Enum:QuantizerSlot");
            ada.visit(visitor);
            visitor.exit_module("adaround", "Enum:QuantizerSlot");
        }
    }

    fn map<M: ModuleMapper<B>>(self, mapper: &mut M) -> Self {
        match self {
            Self::Plain(q) => Self::Plain(q),
            Self::AdaRound(ada) => {
                mapper.enter_module("adaround", "Enum:QuantizerSlot");
                let ada = ada.map(mapper);
                mapper.exit_module("adaround", "Enum:QuantizerSlot");
                Self::AdaRound(ada)
            }
        }
    }

    /// Loads whatever the record holds, whatever the slot held before.
    fn load_record(self, record: Self::Record) -> Self {
        match (self, record) {
            (_, QuantizerSlotRecord::Plain(q)) => Self::Plain(q),
            (Self::AdaRound(ada), QuantizerSlotRecord::AdaRound(r)) => {
                Self::AdaRound(ada.load_record(r))
            }
            (Self::Plain(_), QuantizerSlotRecord::AdaRound(r)) => {
                Self::AdaRound(AdaRoundQuantizer::from_record(r))
            }
        }
    }

    fn into_record(self) -> Self::Record {
        match self {
            Self::Plain(q) => QuantizerSlotRecord::Plain(q),
            Self::AdaRound(ada) => QuantizerSlotRecord::AdaRound(ada.into_record()),
        }
    }

    fn to_device(self, device: &B::Device) -> Self {
        match self {
            Self::AdaRound(ada) => Self::AdaRound(ada.to_device(device)),
            plain => plain,
        }
    }

    fn fork(self, device: &B::Device) -> Self {
        match self {
            Self::AdaRound(ada) => Self::AdaRound(ada.fork(device)),
            plain => plain,
        }
    }

    fn collect_devices(&self, devices: Devices<B>) -> Devices<B> {
        match self {
            Self::AdaRound(ada) => ada.collect_devices(devices),
            Self::Plain(_) => devices,
        }
    }
}

impl<B: AutodiffBackend> AutodiffModule<B> for QuantizerSlot<B> {
    type InnerModule = QuantizerSlot<B::InnerBackend>;

    fn valid(&self) -> Self::InnerModule {
        match self {
            Self::Plain(q) => QuantizerSlot::Plain(q.clone()),
            Self::AdaRound(ada) => QuantizerSlot::AdaRound(ada.valid()),
        }
    }

    fn from_inner(module: Self::InnerModule) -> Self {
        match module {
            QuantizerSlot::Plain(q) => Self::Plain(q),
            QuantizerSlot::AdaRound(ada) => Self::AdaRound(AdaRoundQuantizer::from_inner(ada)),
        }
    }
}

impl<B: Backend> ModuleDisplayDefault for QuantizerSlot<B> {
    fn content(&self, content: Content) -> Option<Content> {
        match self {
            Self::Plain(q) => content.add_formatted(&format!("{q:?}")).optional(),
            Self::AdaRound(ada) => ada.content(content),
        }
    }
}

impl<B: Backend> ModuleDisplay for QuantizerSlot<B> {}
