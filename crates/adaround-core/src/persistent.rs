//! Plain-data values that live inside Burn modules and are saved with their record.
//!
//! Burn saves tensors through [`Param`](burn::module::Param); scalars and strings are
//! constants that a record does not keep. The configuration of a quantizer must survive a
//! save/load round trip, so these types implement [`Module`](burn::module::Module) with
//! themselves (serialized by serde) as their record.

/// Implements `Module`, `AutodiffModule`, `Record` and the display traits for a
/// `Clone + Debug + Serialize + DeserializeOwned` type, so that it is stored in the record.
#[macro_export]
#[doc(hidden)]
macro_rules! persistent_module {
    ($type:ty) => {
        // Stored as JSON text: every recorder (bincode included, which cannot read serde's
        // tagged enums) keeps a string.
        impl<B: burn::tensor::backend::Backend> burn::record::Record<B> for $type {
            type Item<S: burn::record::PrecisionSettings> = String;

            fn into_item<S: burn::record::PrecisionSettings>(self) -> Self::Item<S> {
                $crate::__private::serde_json::to_string(&self)
                    .expect("plain configuration data always serializes")
            }

            fn from_item<S: burn::record::PrecisionSettings>(
                item: Self::Item<S>,
                _device: &B::Device,
            ) -> Self {
                $crate::__private::serde_json::from_str(&item).unwrap_or_else(|e| {
                    panic!("corrupt {} in record: {e}: {item}", stringify!($type))
                })
            }
        }

        impl<B: burn::tensor::backend::Backend> burn::module::Module<B> for $type {
            type Record = $type;

            fn visit<V: burn::module::ModuleVisitor<B>>(&self, _visitor: &mut V) {}

            fn map<M: burn::module::ModuleMapper<B>>(self, _mapper: &mut M) -> Self {
                self
            }

            fn load_record(self, record: Self::Record) -> Self {
                record
            }

            fn into_record(self) -> Self::Record {
                self
            }

            fn to_device(self, _device: &B::Device) -> Self {
                self
            }

            fn fork(self, _device: &B::Device) -> Self {
                self
            }

            fn collect_devices(
                &self,
                devices: burn::module::Devices<B>,
            ) -> burn::module::Devices<B> {
                devices
            }
        }

        impl<B: burn::tensor::backend::AutodiffBackend> burn::module::AutodiffModule<B> for $type {
            type InnerModule = $type;

            fn valid(&self) -> Self::InnerModule {
                self.clone()
            }

            fn from_inner(module: Self::InnerModule) -> Self {
                module
            }
        }

        impl burn::module::ModuleDisplayDefault for $type {
            fn content(&self, content: burn::module::Content) -> Option<burn::module::Content> {
                content.add_formatted(&format!("{self:?}")).optional()
            }
        }

        impl burn::module::ModuleDisplay for $type {}
    };
}
