//! Binding named parameters from safetensors checkpoints.
//!
//! A [`Checkpoint`] is one or more `.safetensors` files (shards), memory-mapped. Opening one
//! validates it completely before anything is trusted: the header length against the file
//! length, the JSON header (parsed with `serde_json`, repeated tensor names refused), every
//! tensor's dtype, shape (element count and byte size without overflow) and data offsets (in
//! bounds, sized `numel × dtype size`, no overlaps, no gaps, no trailing bytes). kiln runs these
//! checks itself, before the `safetensors` crate sees the header, because that crate can panic
//! on offsets that overflow and its errors name no tensor; here each problem is explained in
//! words naming the file and the tensor. The crate's own `SafeTensors::read_metadata` then
//! validates the file again and supplies the metadata used afterwards.
//!
//! [`Checkpoint::load`] decodes a tensor in its own dtype, [`Checkpoint::load_as`] converts it
//! (between float dtypes, or widening integers) with `kiln_kernels::convert`, and
//! [`Checkpoint::bind`] loads every [`Op::Param`](kiln_ir::Op::Param) of a graph, checked against
//! the parameter's declared type. Data is little-endian, as safetensors specifies.

use crate::tensor::{Storage, Tensor};
use kiln_ir::{DType, Graph, TensorType};
use kiln_kernels::convert::{self, ConvertError};
use memmap2::Mmap;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensorError, SafeTensors};
use serde::de::{Deserializer as _, MapAccess, Visitor};
use serde::Serialize as _;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

/// The largest header the `safetensors` crate accepts (its `MAX_HEADER_SIZE`).
const MAX_HEADER_LEN: u64 = 100_000_000;

/// How [`Checkpoint::bind`] treats a tensor whose dtype differs from the parameter's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Convert {
    /// The tensor must have exactly the parameter's dtype.
    Exact,
    /// Float tensors are converted to the parameter's float dtype (rounding to nearest even, fp8
    /// as PyTorch's casts) and integers widened losslessly (u8 to i32 or i64, i32 to i64).
    Cast,
}

/// Why a checkpoint could not be opened, or a tensor not loaded or bound.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// The file could not be opened, inspected or mapped.
    #[error("cannot read {}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid safetensors file (header unparseable, truncated, offsets lying).
    #[error("{} is not a valid safetensors file: {message}", .path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// No file of the checkpoint has a tensor of this name.
    #[error("no tensor \"{name}\" in {checkpoint}")]
    Missing {
        /// The tensor asked for.
        name: String,
        /// The checkpoint's files, printed.
        checkpoint: String,
    },
    /// The tensor's dtype is not the one asked for and cannot (or, under [`Convert::Exact`], may
    /// not) be converted to it.
    #[error("{}: tensor \"{name}\" has dtype {found} {reason}", .path.display())]
    DtypeMismatch {
        /// The file holding the tensor.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// The dtype asked for.
        expected: DType,
        /// The tensor's dtype in the file.
        found: String,
        /// The rest of the sentence: who wanted `expected` and whether a conversion exists.
        reason: String,
    },
    /// The tensor's shape is not the parameter's.
    #[error("{}: tensor \"{name}\" has shape {found} but the model expects {expected}", .path.display())]
    ShapeMismatch {
        /// The file holding the tensor.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// The parameter's shape, printed like `[64, 128]`.
        expected: String,
        /// The tensor's shape in the file, printed the same way.
        found: String,
    },
    /// The tensor's safetensors dtype has no kiln equivalent.
    #[error(
        "{}: tensor \"{name}\" has dtype {dtype}, which kiln does not support (it reads F32, F16, \
         BF16, F8_E4M3, F8_E5M2, I64, I32, U8 and BOOL)",
        .path.display()
    )]
    UnsupportedDtype {
        /// The file holding the tensor.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// Its safetensors dtype, e.g. `F64`.
        dtype: String,
    },
    /// Two shards of a checkpoint hold a tensor of the same name.
    #[error("tensor \"{name}\" is in more than one file of the checkpoint: {}", join_paths(.paths))]
    Duplicate {
        /// The tensor.
        name: String,
        /// The files that both hold it.
        paths: Vec<PathBuf>,
    },
    /// A graph parameter's shape has symbolic dims, so no checkpoint tensor can be checked
    /// against it.
    #[error(
        "parameter \"{name}\" has type {ty}, whose shape is not fixed; only parameters with \
         fixed shapes can be bound from a checkpoint"
    )]
    Symbolic {
        /// The parameter.
        name: String,
        /// Its declared type, printed.
        ty: String,
    },
}

fn join_paths(paths: &[PathBuf]) -> String {
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    names.join(" and ")
}

/// One memory-mapped safetensors file, validated.
struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Offset of the data section in the file: 8 + header length.
    data_start: usize,
    /// The header as the `safetensors` crate read it.
    metadata: Metadata,
}

impl Shard {
    /// Opens, maps and validates one file; returns it with its tensor names in header order.
    fn open(path: &Path) -> Result<(Shard, Vec<String>), WeightsError> {
        let io = |source| WeightsError::Io {
            path: path.to_path_buf(),
            source,
        };
        let format = |message: String| WeightsError::Format {
            path: path.to_path_buf(),
            message,
        };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        // Refuse short files before mapping: mapping an empty file is an error on some
        // platforms, and these deserve their own message.
        if len == 0 {
            return Err(format("the file is empty".into()));
        }
        if len < 8 {
            return Err(format(format!(
                "the file is only {len} bytes long, too short for the 8-byte header length \
                 that starts every safetensors file"
            )));
        }
        // SAFETY: a file-backed map is only sound while no one modifies or truncates the file;
        // if the file changed under the map, the bytes behind the `&[u8]` views handed out
        // below would change (or the process would fault on a truncated page). Checkpoints are
        // read-only inputs that nothing writes while a model is loaded, and we assume exactly
        // that. The map is read-only and private to this `Shard`. Everything below works on the
        // mapped bytes and their actual length, never on `len` above.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        let (data_start, tensors) = validate(&mmap).map_err(format)?;

        // Second line of defence: the crate's own validation must agree. `validate` has already
        // checked everything it checks (and bounded every offset by the file length, which
        // keeps its unchecked `buffer_end + 8 + n` from overflowing), so this should not fail.
        let (header_len, metadata) =
            SafeTensors::read_metadata(&mmap).map_err(|e| format(crate_error_message(e)))?;
        let agrees = header_len.checked_add(8) == Some(data_start)
            && metadata.tensors().len() == tensors.len()
            && tensors.iter().all(|t| {
                metadata.info(&t.name).is_some_and(|info| {
                    info.dtype == t.dtype
                        && info.shape == t.shape
                        && info.data_offsets == (t.start, t.end)
                })
            });
        if !agrees {
            return Err(format(
                "the safetensors library reads its header differently from kiln's own check \
                 (ambiguous JSON?)"
                    .into(),
            ));
        }
        let names = tensors.into_iter().map(|t| t.name).collect();
        Ok((
            Shard {
                path: path.to_path_buf(),
                mmap,
                data_start,
                metadata,
            },
            names,
        ))
    }

    /// The bytes of a tensor's data.
    fn bytes(&self, info: &TensorInfo) -> Result<&[u8], WeightsError> {
        let (start, end) = info.data_offsets;
        self.data_start
            .checked_add(start)
            .zip(self.data_start.checked_add(end))
            .and_then(|(s, e)| self.mmap.get(s..e))
            .ok_or_else(|| WeightsError::Format {
                path: self.path.clone(),
                message: format!("tensor data at bytes {start}..{end} lies outside the file"),
            })
    }
}

/// A safetensors checkpoint: one or more memory-mapped files whose tensors together have
/// distinct names.
pub struct Checkpoint {
    shards: Vec<Shard>,
    /// Tensor name to the index of the shard holding it.
    index: BTreeMap<String, usize>,
}

impl fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checkpoint")
            .field("paths", &self.paths().collect::<Vec<_>>())
            .field("tensors", &self.index.len())
            .finish()
    }
}

impl Checkpoint {
    /// Opens and validates one `.safetensors` file.
    pub fn open(path: &Path) -> Result<Checkpoint, WeightsError> {
        Checkpoint::open_many(&[path.to_path_buf()])
    }

    /// Opens and validates the shards of a checkpoint. A tensor name in two files (or twice in
    /// the list) is a [`WeightsError::Duplicate`].
    pub fn open_many(paths: &[PathBuf]) -> Result<Checkpoint, WeightsError> {
        let mut shards: Vec<Shard> = Vec::with_capacity(paths.len());
        let mut index = BTreeMap::new();
        for path in paths {
            let (shard, names) = Shard::open(path)?;
            for name in names {
                if let Some(&other) = index.get(&name) {
                    let first: &Shard = &shards[other];
                    return Err(WeightsError::Duplicate {
                        name,
                        paths: vec![first.path.clone(), path.clone()],
                    });
                }
                index.insert(name, shards.len());
            }
            shards.push(shard);
        }
        Ok(Checkpoint { shards, index })
    }

    /// The files, in the order given.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.shards.iter().map(|s| s.path.as_path())
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// The kiln dtype and shape of a tensor; `None` when there is no such tensor or its dtype
    /// has no kiln equivalent ([`Checkpoint::load`] says which).
    pub fn info(&self, name: &str) -> Option<(DType, Vec<usize>)> {
        let (_, info) = self.entry(name).ok()?;
        Some((kiln_dtype(info.dtype)?, info.shape.clone()))
    }

    /// Loads a tensor in its own dtype, bit for bit.
    pub fn load(&self, name: &str) -> Result<Tensor, WeightsError> {
        let (shard, info) = self.entry(name)?;
        let dtype = supported(shard, name, info)?;
        decode(shard, name, info, dtype, dtype)
    }

    /// Loads a tensor converted to `dtype`: any float dtype to any other (rounding to nearest
    /// even; fp8 as PyTorch's casts), integers widened losslessly (u8 to i32 or i64, i32 to
    /// i64), or the tensor's own dtype unchanged. Other combinations are a
    /// [`WeightsError::DtypeMismatch`].
    pub fn load_as(&self, name: &str, dtype: DType) -> Result<Tensor, WeightsError> {
        let (shard, info) = self.entry(name)?;
        let from = supported(shard, name, info)?;
        if !convert::converts(from, dtype) {
            return Err(dtype_mismatch(
                shard,
                name,
                dtype,
                from,
                format!("and cannot be loaded as {dtype}: {}", CONVERSIONS),
            ));
        }
        decode(shard, name, info, from, dtype)
    }

    /// Loads every parameter of `graph`: for each [`Op::Param`](kiln_ir::Op::Param), the tensor
    /// of that name, whose shape must equal the parameter's (fixed) shape and whose dtype must
    /// equal the parameter's under [`Convert::Exact`] or convert to it under
    /// [`Convert::Cast`]. All parameters are checked against the headers before any data is
    /// read. Returns the tensors by parameter name, in the parameters' dtypes.
    pub fn bind(
        &self,
        graph: &Graph,
        policy: Convert,
    ) -> Result<HashMap<String, Tensor>, WeightsError> {
        let mut plan: Vec<(&str, DType)> = Vec::new();
        for (name, _, ty) in graph.params() {
            let expected = fixed_shape(name, ty)?;
            let (shard, info) = self.entry(name)?;
            let found = supported(shard, name, info)?;
            let same_shape = info.shape.len() == expected.len()
                && info
                    .shape
                    .iter()
                    .zip(&expected)
                    .all(|(&f, &e)| i64::try_from(f) == Ok(e));
            if !same_shape {
                return Err(WeightsError::ShapeMismatch {
                    path: shard.path.clone(),
                    name: name.to_string(),
                    expected: format!("{expected:?}"),
                    found: format!("{:?}", info.shape),
                });
            }
            let want = ty.dtype;
            if found != want {
                let convertible = convert::converts(found, want);
                let reason = match (policy, convertible) {
                    (Convert::Cast, true) => None,
                    (Convert::Exact, true) => Some(format!(
                        "but the model expects {want} (binding with Convert::Cast would convert it)"
                    )),
                    (_, false) => Some(format!(
                        "but the model expects {want}, and there is no conversion: {CONVERSIONS}"
                    )),
                };
                if let Some(reason) = reason {
                    return Err(dtype_mismatch(shard, name, want, found, reason));
                }
            }
            plan.push((name, want));
        }
        let mut bound = HashMap::with_capacity(plan.len());
        for (name, dtype) in plan {
            // A verified graph declares each parameter once; a repeat is loaded once.
            if !bound.contains_key(name) {
                bound.insert(name.to_string(), self.load_as(name, dtype)?);
            }
        }
        Ok(bound)
    }

    /// The shard and header entry of a tensor.
    fn entry(&self, name: &str) -> Result<(&Shard, &TensorInfo), WeightsError> {
        self.index
            .get(name)
            .and_then(|&i| self.shards.get(i))
            .and_then(|shard| Some((shard, shard.metadata.info(name)?)))
            .ok_or_else(|| WeightsError::Missing {
                name: name.to_string(),
                checkpoint: self.describe(),
            })
    }

    /// The checkpoint's files, for messages.
    fn describe(&self) -> String {
        match self.shards.as_slice() {
            [] => "the checkpoint (it has no files)".to_string(),
            [one] => one.path.display().to_string(),
            many => {
                let names: Vec<String> =
                    many.iter().map(|s| s.path.display().to_string()).collect();
                format!("any of the {} files {}", many.len(), names.join(", "))
            }
        }
    }
}

/// What converts to what, for messages.
const CONVERSIONS: &str = "only float dtypes convert among each other, and integers only widen \
                           (u8 to i32 or i64, i32 to i64)";

fn dtype_mismatch(
    shard: &Shard,
    name: &str,
    expected: DType,
    found: DType,
    reason: String,
) -> WeightsError {
    WeightsError::DtypeMismatch {
        path: shard.path.clone(),
        name: name.to_string(),
        expected,
        found: found.to_string(),
        reason,
    }
}

/// A parameter's shape as numbers, or [`WeightsError::Symbolic`].
fn fixed_shape(name: &str, ty: &TensorType) -> Result<Vec<i64>, WeightsError> {
    ty.shape
        .iter()
        .map(|d| d.as_fixed())
        .collect::<Option<Vec<i64>>>()
        .ok_or_else(|| WeightsError::Symbolic {
            name: name.to_string(),
            ty: ty.to_string(),
        })
}

/// The kiln dtype of a safetensors dtype, if kiln has one.
fn kiln_dtype(dtype: Dtype) -> Option<DType> {
    Some(match dtype {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F8_E4M3 => DType::F8E4M3,
        Dtype::F8_E5M2 => DType::F8E5M2,
        Dtype::I64 => DType::I64,
        Dtype::I32 => DType::I32,
        Dtype::U8 => DType::U8,
        Dtype::BOOL => DType::Bool,
        _ => return None,
    })
}

/// The kiln dtype of a tensor, or [`WeightsError::UnsupportedDtype`].
fn supported(shard: &Shard, name: &str, info: &TensorInfo) -> Result<DType, WeightsError> {
    kiln_dtype(info.dtype).ok_or_else(|| WeightsError::UnsupportedDtype {
        path: shard.path.clone(),
        name: name.to_string(),
        dtype: info.dtype.to_string(),
    })
}

/// Decodes a tensor's bytes (dtype `from`) into a tensor of dtype `to`.
fn decode(
    shard: &Shard,
    name: &str,
    info: &TensorInfo,
    from: DType,
    to: DType,
) -> Result<Tensor, WeightsError> {
    fn run<T>(f: convert::Decoder<T>, from: DType, bytes: &[u8]) -> Result<Vec<T>, ConvertError> {
        let mut out = Vec::new();
        f(from, bytes, &mut out)?;
        Ok(out)
    }
    let bytes = shard.bytes(info)?;
    let storage = match to {
        DType::F32 => run(convert::decode_f32, from, bytes).map(Storage::F32),
        DType::F16 => run(convert::decode_f16, from, bytes).map(Storage::F16),
        DType::BF16 => run(convert::decode_bf16, from, bytes).map(Storage::BF16),
        DType::F8E4M3 => run(convert::decode_f8e4m3, from, bytes).map(Storage::F8E4M3),
        DType::F8E5M2 => run(convert::decode_f8e5m2, from, bytes).map(Storage::F8E5M2),
        DType::I64 => run(convert::decode_i64, from, bytes).map(Storage::I64),
        DType::I32 => run(convert::decode_i32, from, bytes).map(Storage::I32),
        DType::U8 => run(convert::decode_u8, from, bytes).map(Storage::U8),
        DType::Bool => run(convert::decode_bool, from, bytes).map(Storage::Bool),
    };
    let format = |message: String| WeightsError::Format {
        path: shard.path.clone(),
        message: format!("tensor \"{name}\": {message}"),
    };
    let storage = storage.map_err(|e| match e {
        ConvertError::Unsupported { .. } => dtype_mismatch(
            shard,
            name,
            to,
            from,
            format!("and cannot be loaded as {to}: {e}"),
        ),
        ConvertError::Length { .. } => format(e.to_string()),
    })?;
    Tensor::new(info.shape.clone(), storage).map_err(|e| format(e.to_string()))
}

/// Words for an error of the `safetensors` crate, which [`validate`] should have pre-empted.
fn crate_error_message(error: SafeTensorError) -> String {
    match error {
        SafeTensorError::InvalidHeaderDeserialization(e) | SafeTensorError::JsonError(e) => {
            format!("the header is not valid safetensors JSON: {e}")
        }
        SafeTensorError::MetadataIncompleteBuffer => {
            "the header's tensors do not cover the data section exactly".to_string()
        }
        SafeTensorError::InvalidOffset(name) => {
            format!("tensor \"{name}\" does not start where the previous tensor ends")
        }
        SafeTensorError::TensorInvalidInfo => {
            "a tensor's data offsets disagree with its dtype and shape".to_string()
        }
        other => format!("the safetensors library rejects it: {other}"),
    }
}

/// One tensor entry of a header, as kiln's own checks read it.
struct RawTensor {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// Validates a whole safetensors file: returns the offset of its data section and its tensors
/// in header order, or a message saying what is wrong.
fn validate(file: &[u8]) -> Result<(usize, Vec<RawTensor>), String> {
    let Some((prefix, rest)) = file.split_first_chunk::<8>() else {
        return Err(format!(
            "the file is only {} bytes long, too short for the 8-byte header length that \
             starts every safetensors file",
            file.len()
        ));
    };
    let claimed = u64::from_le_bytes(*prefix);
    let header = usize::try_from(claimed)
        .ok()
        .and_then(|n| rest.split_at_checked(n));
    let Some((header, data)) = header else {
        return Err(format!(
            "its first 8 bytes give a header length of {claimed} bytes, but only {} bytes follow \
             (truncated, or not a safetensors file?)",
            rest.len()
        ));
    };
    if claimed > MAX_HEADER_LEN {
        return Err(format!(
            "the header is {claimed} bytes long, more than the {MAX_HEADER_LEN} bytes safetensors \
             allows"
        ));
    }
    let text =
        std::str::from_utf8(header).map_err(|e| format!("the header is not UTF-8 text: {e}"))?;
    let tensors = header_tensors(parse_header(text)?)?;
    check_layout(&tensors, data.len())?;
    Ok((file.len() - data.len(), tensors))
}

/// Every safetensors dtype, to parse dtype names (they print as they are spelled in headers).
const DTYPES: [Dtype; 19] = [
    Dtype::BOOL,
    Dtype::F4,
    Dtype::F6_E2M3,
    Dtype::F6_E3M2,
    Dtype::U8,
    Dtype::I8,
    Dtype::F8_E5M2,
    Dtype::F8_E4M3,
    Dtype::F8_E8M0,
    Dtype::I16,
    Dtype::U16,
    Dtype::F16,
    Dtype::BF16,
    Dtype::I32,
    Dtype::U32,
    Dtype::F32,
    Dtype::F64,
    Dtype::I64,
    Dtype::U64,
];

/// The entries of a header's top-level object in order, repeats included (a `serde_json::Map`
/// would silently keep one of them).
struct Entries;

impl<'de> Visitor<'de> for Entries {
    type Value = Vec<(String, Value)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = map.next_entry()? {
            entries.push(entry);
        }
        Ok(entries)
    }
}

/// Parses a header's JSON text into its top-level entries. Anything but an object is parsed
/// only to say what it is.
fn parse_header(text: &str) -> Result<Vec<(String, Value)>, String> {
    let invalid = |e: serde_json::Error| format!("the header is not valid JSON: {e}");
    if !text
        .trim_start_matches([' ', '\t', '\n', '\r'])
        .starts_with('{')
    {
        let value: Value = serde_json::from_str(text).map_err(invalid)?;
        return Err(format!(
            "the header is {}, not an object mapping tensor names to their dtype, shape and \
             offsets",
            kind(&value)
        ));
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let entries = de.deserialize_map(Entries).map_err(invalid)?;
    de.end().map_err(invalid)?;
    Ok(entries)
}

/// "an object", "a string", ... for messages.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The value printed as JSON with spaces (`[0, 4]`, `{"format": 1}`), cut to about 60
/// characters; at most 241 bytes are ever printed, however large the value.
fn short(value: &Value) -> String {
    struct Spaced;
    impl serde_json::ser::Formatter for Spaced {
        fn begin_array_value<W>(&mut self, w: &mut W, first: bool) -> std::io::Result<()>
        where
            W: ?Sized + std::io::Write,
        {
            w.write_all(if first { b"" } else { b", " })
        }
        fn begin_object_key<W>(&mut self, w: &mut W, first: bool) -> std::io::Result<()>
        where
            W: ?Sized + std::io::Write,
        {
            w.write_all(if first { b"" } else { b", " })
        }
        fn begin_object_value<W>(&mut self, w: &mut W) -> std::io::Result<()>
        where
            W: ?Sized + std::io::Write,
        {
            w.write_all(b": ")
        }
    }
    // Writing past the buffer fails, which stops the serializer: the error is expected.
    let mut buf = [0u8; 241];
    let mut rest = &mut buf[..];
    let mut serializer = serde_json::Serializer::with_formatter(&mut rest, Spaced);
    let _ = value.serialize(&mut serializer);
    let unused = rest.len();
    let s = String::from_utf8_lossy(&buf[..buf.len() - unused]);
    if s.chars().count() > 60 {
        s.chars().take(57).collect::<String>() + "..."
    } else {
        s.into_owned()
    }
}

/// The elements of a list of integers that all fit usize.
fn usizes(value: &Value) -> Option<Vec<usize>> {
    let items = value.as_array()?;
    items
        .iter()
        .map(|v| v.as_u64().and_then(|n| usize::try_from(n).ok()))
        .collect()
}

/// The tensor entries of a parsed header, checked for form: an object of tensor names to
/// `{"dtype": ..., "shape": [...], "data_offsets": [start, end]}`, plus an optional
/// `__metadata__` object of strings.
fn header_tensors(entries: Vec<(String, Value)>) -> Result<Vec<RawTensor>, String> {
    let mut seen = HashSet::new();
    let mut tensors = Vec::with_capacity(entries.len());
    for (name, value) in entries {
        if !seen.insert(name.clone()) {
            return Err(format!("the header lists \"{name}\" twice"));
        }
        if name == "__metadata__" {
            if !value
                .as_object()
                .is_some_and(|fields| fields.values().all(Value::is_string))
            {
                return Err(format!(
                    "the header's \"__metadata__\" must map names to strings, but it is {}",
                    short(&value)
                ));
            }
            continue;
        }
        let Value::Object(fields) = value else {
            return Err(format!(
                "the header entry for tensor \"{name}\" is {}, not an object",
                kind(&value)
            ));
        };
        let field = |key: &str| {
            fields
                .get(key)
                .ok_or_else(|| format!("the header entry for tensor \"{name}\" has no \"{key}\""))
        };
        let dtype = match field("dtype")? {
            Value::String(s) => DTYPES
                .into_iter()
                .find(|d| d.to_string() == *s)
                .ok_or_else(|| {
                    format!("tensor \"{name}\" has dtype \"{s}\", which is not a safetensors dtype")
                })?,
            other => {
                return Err(format!(
                    "tensor \"{name}\" has dtype {}, which is not a string",
                    short(other)
                ))
            }
        };
        let shape_value = field("shape")?;
        let shape = usizes(shape_value).ok_or_else(|| {
            format!(
                "tensor \"{name}\" has shape {}, which is not a list of non-negative integers",
                short(shape_value)
            )
        })?;
        let offsets_value = field("data_offsets")?;
        let (start, end) = match usizes(offsets_value).as_deref() {
            Some(&[start, end]) => (start, end),
            _ => {
                return Err(format!(
                    "tensor \"{name}\" has data_offsets {}, which is not a pair of non-negative \
                     integers [start, end]",
                    short(offsets_value)
                ))
            }
        };
        tensors.push(RawTensor {
            name,
            dtype,
            shape,
            start,
            end,
        });
    }
    Ok(tensors)
}

/// Checks each tensor's byte size against its offsets, then that the tensors tile the data
/// section exactly: no tensor past its end, no overlaps, no gaps, no trailing bytes.
fn check_layout(tensors: &[RawTensor], data_len: usize) -> Result<(), String> {
    for t in tensors {
        let name = &t.name;
        let (start, end) = (t.start, t.end);
        if end < start {
            return Err(format!(
                "tensor \"{name}\" has data_offsets [{start}, {end}], which end before they start"
            ));
        }
        let shape = format!("{:?}", t.shape);
        let bits = t
            .shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .and_then(|n| n.checked_mul(t.dtype.bitsize()));
        let Some(bits) = bits else {
            return Err(format!(
                "tensor \"{name}\" has shape {shape}, which has more elements than can be \
                 addressed"
            ));
        };
        if bits % 8 != 0 {
            return Err(format!(
                "tensor \"{name}\" ({} with shape {shape}) does not fill a whole number of bytes",
                t.dtype
            ));
        }
        let size = bits / 8;
        if end - start != size {
            return Err(format!(
                "tensor \"{name}\" is {} with shape {shape}, which takes {size} bytes, but its \
                 data_offsets [{start}, {end}] span {} bytes",
                t.dtype,
                end - start
            ));
        }
    }
    if let Some(last) = tensors.iter().max_by_key(|t| t.end) {
        if last.end > data_len {
            return Err(format!(
                "the header claims {} bytes of data but the file has {data_len} (truncated?); \
                 tensor \"{}\" lies at bytes {}..{} of the data",
                last.end, last.name, last.start, last.end
            ));
        }
    }
    let mut order: Vec<&RawTensor> = tensors.iter().collect();
    order.sort_by_key(|t| (t.start, t.end));
    let mut covered = 0;
    let mut previous: Option<&RawTensor> = None;
    for t in order {
        if t.start < covered {
            let p = previous.map_or("", |p| p.name.as_str());
            let (ps, pe) = previous.map_or((0, 0), |p| (p.start, p.end));
            return Err(format!(
                "tensors \"{p}\" (bytes {ps}..{pe}) and \"{}\" (bytes {}..{}) overlap",
                t.name, t.start, t.end
            ));
        }
        if t.start > covered {
            let place = match previous {
                Some(p) => format!("between tensors \"{}\" and \"{}\"", p.name, t.name),
                None => format!("before the first tensor \"{}\"", t.name),
            };
            return Err(format!(
                "bytes {covered}..{} of the data lie {place} and belong to no tensor \
                 (safetensors data has no gaps)",
                t.start
            ));
        }
        covered = t.end;
        previous = Some(t);
    }
    if covered < data_len {
        return Err(format!(
            "the file has {data_len} bytes of data but the header accounts for only {covered}; \
             the last {} bytes belong to no tensor",
            data_len - covered
        ));
    }
    Ok(())
}
