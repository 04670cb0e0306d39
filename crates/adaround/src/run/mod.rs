//! Driving a run over a model: the builder and the run loop (`driver`), the forward pass in
//! stages, block reconstruction, choosing between methods on held-out samples (`choose`),
//! finding the layers, the model-level guard, and one
//! layer's data and halves (`site`).

pub(crate) mod block;
pub(crate) mod choose;
pub(crate) mod discover;
pub(crate) mod driver;
pub(crate) mod guard;
pub(crate) mod site;
pub(crate) mod stages;
