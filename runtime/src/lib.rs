//! kiln's runtime: host tensors, the reference executor that defines what every graph
//! means, and binding parameters from safetensors checkpoints. It never depends on the compiler.

pub mod cpu;
pub mod generate;
pub mod graph_lm;
pub mod lm;
pub mod reference;
pub mod tensor;
pub mod weights;

pub use graph_lm::GraphLm;
pub use lm::{LanguageModel, ModelError};
pub use reference::{ExecError, ParamSource};
pub use tensor::{Storage, Tensor};
pub use weights::{Checkpoint, Convert, WeightsError};
