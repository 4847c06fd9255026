//! kiln: an ahead-of-time compiler and lean runtime for transformer models.
//!
//! This facade re-exports the workspace's crates under one name:
//! [`ir`] (the typed SSA IR, tracer, verifier and text format), [`compiler`] (graph passes),
//! [`runtime`] (tensors, the reference executor, weight binding) and [`models`] (model families),
//! and adds [`load`]: from a Hugging Face directory or an artifact to a model ready to run, and
//! [`compile`]: from a directory to an artifact.

pub use kiln_compiler as compiler;
pub use kiln_ir as ir;
pub use kiln_models as models;
pub use kiln_runtime as runtime;

pub mod compile;
pub mod load;
pub mod placement;
