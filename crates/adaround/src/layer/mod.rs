//! Optimising one layer: what it is optimised on (`unit`), the loss in Gram form (`gram`),
//! the steps (`step`: autodiff; `fused` and `host`: the closed form, placed by `place`), the schedule loop and
//! finalizing (`optimize`), the refinement after it (`refine`), GPTQ (`gptq`) and SeqMSE's scales (`seqmse`). Nothing here
//! imports from `run`.

pub(crate) mod fused;
pub(crate) mod gptq;
pub(crate) mod gram;
pub(crate) mod host;
pub(crate) mod optimize;
pub(crate) mod place;
pub(crate) mod refine;
pub(crate) mod seqmse;
pub(crate) mod step;
pub(crate) mod unit;
