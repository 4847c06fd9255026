//! kiln's runtime: host tensors, the reference executor that defines what every graph
//! means, binding parameters from safetensors checkpoints, ready-to-use models ([`deploy`]) and
//! the ahead-of-time artifacts they load from ([`artifact`]). It never depends on the compiler.

pub mod artifact;
pub mod background;
pub mod cpu;
pub mod deploy;
pub mod encoder;
pub mod executor;
pub mod generate;
pub mod graph_lm;
pub mod info;
pub mod lm;
pub mod pooling;
pub mod profile;
pub mod provider_log;
pub mod reference;
pub mod tensor;
mod tokenizer_json;
pub mod weights;

pub use deploy::{CausalModel, EncoderModel, Model};
pub use executor::{DeviceValue, GraphExecutor, Value};
pub use graph_lm::GraphLm;
pub use info::{Head, ModelInfo};
pub use lm::{LanguageModel, ModelError};
pub use reference::{ExecError, ParamSource};
pub use tensor::{Storage, Tensor};
pub use weights::{Checkpoint, Convert, WeightsError};

/// Bound parameters by name.
pub type Params = std::collections::HashMap<String, Tensor>;
