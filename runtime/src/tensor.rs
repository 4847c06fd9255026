//! Host tensors: a dtype, a concrete shape, and row-major elements stored in their own format,
//! either owned ([`Storage`]) or borrowed in place from bytes shared with other tensors
//! ([`SharedBytes`]: a memory-mapped artifact), so that loading weights copies nothing; or a
//! 2-D bf16 weight held only in the linear kernels' packed layout ([`Tensor::packed`]: an
//! artifact's, borrowed from its map), which those kernels read as it is.
//!
//! Read elements through [`Tensor::elements`] (or `as_f32`, `get`, ...), which never copies
//! (except from a packed weight, unpacked on first use). [`Tensor::storage`] hands out owned
//! storage: for a borrowing tensor it decodes a copy on first use and keeps it with the tensor,
//! so the hot paths (the CPU backend's weights) avoid it.

use half::{bf16, f16};
use kiln_ir::scalar::Scalar;
use kiln_ir::{f8, DType};
use kiln_kernels::gemm_bf16::PackedBf16;
use std::ops::Range;
use std::sync::{Arc, OnceLock};

/// Elements of a tensor, stored in the tensor's dtype (fp8 as raw bytes).
#[derive(Debug, Clone, PartialEq)]
pub enum Storage {
    /// f32 elements.
    F32(Vec<f32>),
    /// f16 elements.
    F16(Vec<f16>),
    /// bf16 elements.
    BF16(Vec<bf16>),
    /// fp8 e4m3fn bit patterns.
    F8E4M3(Vec<u8>),
    /// fp8 e5m2 bit patterns.
    F8E5M2(Vec<u8>),
    /// i64 elements.
    I64(Vec<i64>),
    /// i32 elements.
    I32(Vec<i32>),
    /// u8 elements.
    U8(Vec<u8>),
    /// bool elements.
    Bool(Vec<bool>),
}

/// A tensor's elements, borrowed, in its dtype (fp8 as raw bytes): what
/// [`Tensor::elements`] gives whether the tensor owns its elements or borrows them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Elements<'a> {
    /// f32 elements.
    F32(&'a [f32]),
    /// f16 elements.
    F16(&'a [f16]),
    /// bf16 elements.
    BF16(&'a [bf16]),
    /// fp8 e4m3fn bit patterns.
    F8E4M3(&'a [u8]),
    /// fp8 e5m2 bit patterns.
    F8E5M2(&'a [u8]),
    /// i64 elements.
    I64(&'a [i64]),
    /// i32 elements.
    I32(&'a [i32]),
    /// u8 elements.
    U8(&'a [u8]),
    /// bool elements.
    Bool(&'a [bool]),
}

/// Read-only bytes shared by the tensors that borrow them, and kept alive by them: a memory-mapped
/// file, or a copy of bytes held in memory aligned for every element type.
#[derive(Clone)]
pub struct SharedBytes(Arc<Backing>);

enum Backing {
    Map(memmap2::Mmap),
    /// `len` bytes at the start of `words` (8-byte aligned).
    Heap {
        words: Vec<u64>,
        len: usize,
    },
}

/// A tensor that cannot borrow the bytes given for it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BorrowError {
    /// The byte range is not inside the shared bytes.
    #[error("bytes {start}..{end} are not inside the {len} shared bytes")]
    OutOfBounds {
        /// First byte asked for.
        start: usize,
        /// End of the range asked for.
        end: usize,
        /// Bytes there are.
        len: usize,
    },
    /// The byte count does not match the dtype and shape.
    #[error("{bytes} bytes do not hold a {dtype} tensor of shape {shape:?}")]
    Size {
        /// The element type.
        dtype: DType,
        /// The shape.
        shape: Vec<usize>,
        /// Bytes given.
        bytes: usize,
    },
    /// The elements do not start at a multiple of their size in memory.
    #[error("{dtype} elements at byte {start} are misaligned in memory")]
    Misaligned {
        /// The element type.
        dtype: DType,
        /// First byte of the range.
        start: usize,
    },
    /// The dtype's bytes cannot be used as elements in place.
    #[error("{dtype} elements cannot be used in place: {why}")]
    NotInPlace {
        /// The element type.
        dtype: DType,
        /// Why not.
        why: &'static str,
    },
    /// Packed forms that do not hold a 2-D bf16 tensor of the shape ([`Tensor::packed`]).
    #[error("packed forms do not hold a bf16 tensor of shape {shape:?}")]
    Packed {
        /// The shape.
        shape: Vec<usize>,
    },
}

/// A tensor on the host.
#[derive(Debug, Clone)]
pub struct Tensor {
    shape: Vec<usize>,
    data: Data,
}

#[derive(Debug, Clone)]
enum Data {
    Owned(Storage),
    Borrowed(Borrowed),
    Packed(Packed),
}

/// A 2-D bf16 tensor held only in the packed layout of the linear kernels, by orientation
/// (`[transposed as usize]`: packed from the tensor as stored `[n, k]`, or from its transpose
/// when stored `[k, n]`); at least one form. Other readers get its elements unpacked.
#[derive(Debug, Clone)]
struct Packed {
    forms: [Option<PackedBf16>; 2],
    /// The elements, unpacked on first use.
    owned: OnceLock<Storage>,
}

impl Packed {
    /// The row-major elements of a `shape` tensor, from either form.
    fn unpack(&self, shape: &[usize]) -> Storage {
        let w = match &self.forms {
            [_, Some(stored)] => stored.unpack(),
            [Some(transposed), None] => {
                let (k, n) = (shape[0], shape[1]);
                let t = transposed.unpack();
                let mut w = vec![bf16::ZERO; n * k];
                for (j, row) in t.chunks_exact(k.max(1)).enumerate().take(n) {
                    for (kk, &v) in row.iter().enumerate() {
                        w[kk * n + j] = v;
                    }
                }
                w
            }
            [None, None] => Vec::new(),
        };
        Storage::BF16(w)
    }
}

/// Elements used in place from shared bytes (checked when made: in bounds, sized for the shape,
/// aligned, a dtype every bit pattern of which is valid, a little-endian host).
#[derive(Debug, Clone)]
struct Borrowed {
    bytes: SharedBytes,
    range: Range<usize>,
    view: View,
    /// The owned copy [`Tensor::storage`] decodes on first use.
    owned: OnceLock<Storage>,
}

/// How a dtype's bytes are viewed as elements.
type View = for<'a> fn(&'a [u8]) -> Elements<'a>;

/// A tensor whose element count disagrees with its shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("shape {shape:?} needs {expected} elements, got {got}")]
pub struct ShapeMismatch {
    /// The shape asked for.
    pub shape: Vec<usize>,
    /// Elements the shape needs.
    pub expected: usize,
    /// Elements given.
    pub got: usize,
}

impl<'a> Elements<'a> {
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            Elements::F32(_) => DType::F32,
            Elements::F16(_) => DType::F16,
            Elements::BF16(_) => DType::BF16,
            Elements::F8E4M3(_) => DType::F8E4M3,
            Elements::F8E5M2(_) => DType::F8E5M2,
            Elements::I64(_) => DType::I64,
            Elements::I32(_) => DType::I32,
            Elements::U8(_) => DType::U8,
            Elements::Bool(_) => DType::Bool,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Elements::F32(v) => v.len(),
            Elements::F16(v) => v.len(),
            Elements::BF16(v) => v.len(),
            Elements::F8E4M3(v) | Elements::F8E5M2(v) | Elements::U8(v) => v.len(),
            Elements::I64(v) => v.len(),
            Elements::I32(v) => v.len(),
            Elements::Bool(v) => v.len(),
        }
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i`, widened.
    ///
    /// # Panics
    /// If `i` is out of range.
    pub fn get(&self, i: usize) -> Scalar {
        match self {
            Elements::F32(v) => Scalar::Float(v[i].into()),
            Elements::F16(v) => Scalar::Float(v[i].to_f64()),
            Elements::BF16(v) => Scalar::Float(v[i].to_f64()),
            Elements::F8E4M3(v) => Scalar::Float(f8::f8e4m3_to_f32(v[i]).into()),
            Elements::F8E5M2(v) => Scalar::Float(f8::f8e5m2_to_f32(v[i]).into()),
            Elements::I64(v) => Scalar::Int(v[i]),
            Elements::I32(v) => Scalar::Int(v[i].into()),
            Elements::U8(v) => Scalar::Int(v[i].into()),
            Elements::Bool(v) => Scalar::Bool(v[i]),
        }
    }

    /// Owned storage of the elements at `picks` (in that order; each in range).
    fn pick(&self, picks: impl Iterator<Item = usize>) -> Storage {
        fn take<T: Copy>(v: &[T], picks: impl Iterator<Item = usize>) -> Vec<T> {
            picks.map(|i| v[i]).collect()
        }
        match *self {
            Elements::F32(v) => Storage::F32(take(v, picks)),
            Elements::F16(v) => Storage::F16(take(v, picks)),
            Elements::BF16(v) => Storage::BF16(take(v, picks)),
            Elements::F8E4M3(v) => Storage::F8E4M3(take(v, picks)),
            Elements::F8E5M2(v) => Storage::F8E5M2(take(v, picks)),
            Elements::I64(v) => Storage::I64(take(v, picks)),
            Elements::I32(v) => Storage::I32(take(v, picks)),
            Elements::U8(v) => Storage::U8(take(v, picks)),
            Elements::Bool(v) => Storage::Bool(take(v, picks)),
        }
    }

    /// An owned copy.
    pub fn to_storage(&self) -> Storage {
        self.pick(0..self.len())
    }
}

impl Storage {
    /// The elements, borrowed.
    pub fn elements(&self) -> Elements<'_> {
        match self {
            Storage::F32(v) => Elements::F32(v),
            Storage::F16(v) => Elements::F16(v),
            Storage::BF16(v) => Elements::BF16(v),
            Storage::F8E4M3(v) => Elements::F8E4M3(v),
            Storage::F8E5M2(v) => Elements::F8E5M2(v),
            Storage::I64(v) => Elements::I64(v),
            Storage::I32(v) => Elements::I32(v),
            Storage::U8(v) => Elements::U8(v),
            Storage::Bool(v) => Elements::Bool(v),
        }
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.elements().dtype()
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.elements().len()
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i`, widened.
    ///
    /// # Panics
    /// If `i` is out of range.
    pub fn get(&self, i: usize) -> Scalar {
        self.elements().get(i)
    }

    /// Builds storage of `dtype` from widened values, converting each as a cast would
    /// (floats rounded to nearest even, fp8 as PyTorch's cast, integers wrapped).
    pub fn from_scalars(dtype: DType, values: impl Iterator<Item = Scalar>) -> Storage {
        match dtype {
            DType::F32 => Storage::F32(values.map(|v| v.as_f64() as f32).collect()),
            DType::F16 => Storage::F16(values.map(|v| f16::from_f32(v.as_f64() as f32)).collect()),
            DType::BF16 => {
                Storage::BF16(values.map(|v| bf16::from_f32(v.as_f64() as f32)).collect())
            }
            DType::F8E4M3 => Storage::F8E4M3(
                values
                    .map(|v| f8::f32_to_f8e4m3(v.as_f64() as f32))
                    .collect(),
            ),
            DType::F8E5M2 => Storage::F8E5M2(
                values
                    .map(|v| f8::f32_to_f8e5m2(v.as_f64() as f32))
                    .collect(),
            ),
            DType::I64 => Storage::I64(values.map(Scalar::as_i64).collect()),
            DType::I32 => Storage::I32(values.map(|v| v.as_i64() as i32).collect()),
            DType::U8 => Storage::U8(values.map(|v| v.as_i64() as u8).collect()),
            DType::Bool => Storage::Bool(values.map(Scalar::as_bool).collect()),
        }
    }
}

impl SharedBytes {
    /// The bytes of `file`, memory-mapped read-only (pages are read when first used).
    pub fn map(file: &std::fs::File) -> std::io::Result<SharedBytes> {
        // SAFETY: a file-backed map is only sound while no one modifies or truncates the file;
        // if the file changed under the map, the bytes behind the slices handed out would
        // change (or the process would fault on a truncated page). Artifacts are read-only
        // inputs that nothing writes while a model runs from them, and we assume exactly that.
        // The map is read-only and private, and everything reads it through its actual length.
        let map = unsafe { memmap2::Mmap::map(file) }?;
        Ok(SharedBytes(Arc::new(Backing::Map(map))))
    }

    /// A copy of `bytes`, aligned for every element type.
    pub fn copy_of(bytes: &[u8]) -> SharedBytes {
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
        SharedBytes(Arc::new(Backing::Heap {
            words,
            len: bytes.len(),
        }))
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        match &*self.0 {
            Backing::Map(m) => m,
            Backing::Heap { words, len } => &bytemuck::cast_slice(words)[..*len],
        }
    }

    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// True when there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Debug for SharedBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &*self.0 {
            Backing::Map(_) => "mapped",
            Backing::Heap { .. } => "in memory",
        };
        write!(f, "SharedBytes({} bytes {kind})", self.len())
    }
}

/// How `dtype`'s little-endian bytes are viewed in place, if they can be: not bool (whose
/// bytes other than 0 and 1 are invalid), and not on a big-endian host.
fn view_of(dtype: DType) -> Result<View, BorrowError> {
    if cfg!(target_endian = "big") {
        return Err(BorrowError::NotInPlace {
            dtype,
            why: "the bytes are little-endian and this host is big-endian",
        });
    }
    // `cast_slice` cannot fail below: `Tensor::borrowed` checked the alignment and the length
    // (a whole number of elements) of the bytes first.
    Ok(match dtype {
        DType::F32 => |b| Elements::F32(bytemuck::cast_slice(b)),
        DType::F16 => |b| Elements::F16(bytemuck::cast_slice(b)),
        DType::BF16 => |b| Elements::BF16(bytemuck::cast_slice(b)),
        DType::F8E4M3 => |b| Elements::F8E4M3(b),
        DType::F8E5M2 => |b| Elements::F8E5M2(b),
        DType::I64 => |b| Elements::I64(bytemuck::cast_slice(b)),
        DType::I32 => |b| Elements::I32(bytemuck::cast_slice(b)),
        DType::U8 => |b| Elements::U8(b),
        DType::Bool => {
            return Err(BorrowError::NotInPlace {
                dtype,
                why: "bool bytes must be checked and converted",
            })
        }
    })
}

impl Borrowed {
    fn elements(&self) -> Elements<'_> {
        (self.view)(&self.bytes.as_slice()[self.range.clone()])
    }
}

impl Tensor {
    /// A tensor from storage and a shape with the same element count.
    pub fn new(shape: Vec<usize>, storage: Storage) -> Result<Tensor, ShapeMismatch> {
        let expected: usize = shape.iter().product();
        if expected != storage.len() {
            return Err(ShapeMismatch {
                shape,
                expected,
                got: storage.len(),
            });
        }
        Ok(Tensor {
            shape,
            data: Data::Owned(storage),
        })
    }

    /// Rewrites the tensor in place as `shape`, with the elements `fill` leaves in its storage
    /// (handed over as it is, to update or overwrite, even to another dtype): a loop that
    /// rewrites one tensor each step (a decode step's ids, or its logits) reuses the shape's
    /// and the elements' allocations. A tensor that borrows its elements is first given an
    /// owned copy. When the element count does not match `shape`, the tensor is left 1-D.
    pub fn rewrite(
        &mut self,
        shape: &[usize],
        fill: impl FnOnce(&mut Storage),
    ) -> Result<(), ShapeMismatch> {
        if !matches!(self.data, Data::Owned(_)) {
            self.data = Data::Owned(self.storage().clone());
        }
        let Data::Owned(storage) = &mut self.data else {
            unreachable!("made owned above");
        };
        fill(storage);
        let (expected, got) = (shape.iter().product(), storage.len());
        self.shape.clear();
        if expected != got {
            self.shape.push(got);
            return Err(ShapeMismatch {
                shape: shape.to_vec(),
                expected,
                got,
            });
        }
        self.shape.extend_from_slice(shape);
        Ok(())
    }

    /// A `dtype` tensor of `shape` whose elements are the little-endian bytes `range` of
    /// `bytes`, used in place (no copy; the tensor keeps the bytes alive). Refuses a range out of
    /// bounds, a byte count that does not hold the shape, elements misaligned in memory, bool
    /// (whose bytes must be checked) and big-endian hosts.
    pub fn borrowed(
        dtype: DType,
        shape: Vec<usize>,
        bytes: &SharedBytes,
        range: Range<usize>,
    ) -> Result<Tensor, BorrowError> {
        let len = bytes.len();
        let Some(b) = bytes.as_slice().get(range.clone()) else {
            return Err(BorrowError::OutOfBounds {
                start: range.start,
                end: range.end,
                len,
            });
        };
        let size = dtype.size_bytes();
        let needed = shape.iter().try_fold(size, |n, &d| n.checked_mul(d));
        if needed != Some(b.len()) {
            return Err(BorrowError::Size {
                dtype,
                shape,
                bytes: b.len(),
            });
        }
        if !(b.as_ptr() as usize).is_multiple_of(size) {
            return Err(BorrowError::Misaligned {
                dtype,
                start: range.start,
            });
        }
        let view = view_of(dtype)?;
        Ok(Tensor {
            shape,
            data: Data::Borrowed(Borrowed {
                bytes: bytes.clone(),
                range,
                view,
                owned: OnceLock::new(),
            }),
        })
    }

    /// A bf16 tensor of `shape` (2-D) held only in packed forms ([`PackedBf16`], by
    /// orientation: `forms[1]` packs it as stored, `[n, k]`; `forms[0]` its transpose, for a
    /// tensor stored `[k, n]`); the linear kernels read them as they are, any other reader gets
    /// the elements unpacked on first use. Refuses forms that are all absent or whose sizes do
    /// not fit the shape.
    pub fn packed(
        shape: Vec<usize>,
        forms: [Option<PackedBf16>; 2],
    ) -> Result<Tensor, BorrowError> {
        let fits = match shape[..] {
            [rows, cols] => {
                forms.iter().any(Option::is_some)
                    && forms.iter().enumerate().all(|(stored, f)| {
                        f.as_ref().is_none_or(|f| {
                            let nk = (f.n(), f.k());
                            nk == if stored == 1 {
                                (rows, cols)
                            } else {
                                (cols, rows)
                            }
                        })
                    })
            }
            _ => false,
        };
        if !fits {
            return Err(BorrowError::Packed { shape });
        }
        Ok(Tensor {
            shape,
            data: Data::Packed(Packed {
                forms,
                owned: OnceLock::new(),
            }),
        })
    }

    /// The packed form of a tensor made by [`Tensor::packed`], for the orientation `transposed`
    /// (stored `[n, k]`) or not.
    pub fn packed_form(&self, transposed: bool) -> Option<&PackedBf16> {
        match &self.data {
            Data::Packed(p) => p.forms[usize::from(transposed)].as_ref(),
            _ => None,
        }
    }

    /// An f32 tensor.
    pub fn from_f32(shape: Vec<usize>, data: Vec<f32>) -> Result<Tensor, ShapeMismatch> {
        Tensor::new(shape, Storage::F32(data))
    }

    /// An i64 tensor.
    pub fn from_i64(shape: Vec<usize>, data: Vec<i64>) -> Result<Tensor, ShapeMismatch> {
        Tensor::new(shape, Storage::I64(data))
    }

    /// A bool tensor.
    pub fn from_bool(shape: Vec<usize>, data: Vec<bool>) -> Result<Tensor, ShapeMismatch> {
        Tensor::new(shape, Storage::Bool(data))
    }

    /// A tensor of `dtype` from widened values (converted as a cast would).
    pub fn from_scalars(
        dtype: DType,
        shape: Vec<usize>,
        values: impl IntoIterator<Item = Scalar>,
    ) -> Result<Tensor, ShapeMismatch> {
        Tensor::new(shape, Storage::from_scalars(dtype, values.into_iter()))
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        match &self.data {
            Data::Packed(_) => DType::BF16,
            _ => self.elements().dtype(),
        }
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        match &self.data {
            Data::Packed(_) => self.shape.iter().product(),
            _ => self.elements().len(),
        }
    }

    /// The elements, borrowed: never a copy, except for a tensor held only packed
    /// ([`Tensor::packed`]), whose elements are unpacked on the first call and kept.
    pub fn elements(&self) -> Elements<'_> {
        match &self.data {
            Data::Owned(s) => s.elements(),
            Data::Borrowed(b) => b.elements(),
            Data::Packed(p) => p.owned.get_or_init(|| p.unpack(&self.shape)).elements(),
        }
    }

    /// True when the elements are used in place from shared bytes ([`Tensor::borrowed`]), or
    /// held only in packed forms borrowed from them.
    pub fn is_borrowed(&self) -> bool {
        match &self.data {
            Data::Owned(_) => false,
            Data::Borrowed(_) => true,
            Data::Packed(p) => p.forms.iter().flatten().all(PackedBf16::is_borrowed),
        }
    }

    /// True when a borrowed tensor has decoded an owned copy of its elements (through
    /// [`Tensor::storage`]), or a packed one unpacked them (through any read of its elements),
    /// which holds as many bytes again for as long as it lives.
    pub fn has_decoded_copy(&self) -> bool {
        match &self.data {
            Data::Owned(_) => false,
            Data::Borrowed(b) => b.owned.get().is_some(),
            Data::Packed(p) => p.owned.get().is_some(),
        }
    }

    /// The elements as owned storage. A tensor borrowing its elements decodes a copy on the
    /// first call and keeps it as long as it lives: read through [`Tensor::elements`] instead
    /// where a borrow will do.
    pub fn storage(&self) -> &Storage {
        match &self.data {
            Data::Owned(s) => s,
            Data::Borrowed(b) => b.owned.get_or_init(|| b.elements().to_storage()),
            Data::Packed(p) => p.owned.get_or_init(|| p.unpack(&self.shape)),
        }
    }

    /// Element `i` (row-major), widened.
    ///
    /// # Panics
    /// If `i >= numel()`.
    pub fn get(&self, i: usize) -> Scalar {
        self.elements().get(i)
    }

    /// The f32 elements, if the tensor is f32.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match self.elements() {
            Elements::F32(v) => Some(v),
            _ => None,
        }
    }

    /// The i64 elements, if the tensor is i64.
    pub fn as_i64(&self) -> Option<&[i64]> {
        match self.elements() {
            Elements::I64(v) => Some(v),
            _ => None,
        }
    }

    /// The sub-tensors `self[i]` for each `i` of `rows`, stacked along a new axis 0 (rows may
    /// repeat); `None` for a rank-0 tensor or an index out of range.
    pub fn select_rows(&self, rows: &[usize]) -> Option<Tensor> {
        let (&n, rest) = self.shape.split_first()?;
        if rows.iter().any(|&r| r >= n) {
            return None;
        }
        let chunk: usize = rest.iter().product();
        let storage = self
            .elements()
            .pick(rows.iter().flat_map(|&r| r * chunk..(r + 1) * chunk));
        let mut shape = self.shape.clone();
        shape[0] = rows.len();
        Tensor::new(shape, storage).ok()
    }

    /// All elements widened to f64 (bool as 0/1).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        (0..self.numel()).map(|i| self.get(i).as_f64()).collect()
    }

    /// A copy converted to `dtype` (as a cast). Between the float types kiln computes in (and
    /// to the same dtype) it converts slice to slice; the values are those of the general
    /// path through [`Scalar`] (f32 → f64 → f32 is exact, and each narrowing rounds once).
    pub fn cast(&self, dtype: DType) -> Tensor {
        fn map<S: Copy, D>(v: &[S], f: impl Fn(S) -> D) -> Vec<D> {
            v.iter().map(|&x| f(x)).collect()
        }
        let storage = match (self.elements(), dtype) {
            (e, d) if e.dtype() == d => e.to_storage(),
            (Elements::F32(v), DType::BF16) => Storage::BF16(map(v, bf16::from_f32)),
            (Elements::F32(v), DType::F16) => Storage::F16(map(v, f16::from_f32)),
            (Elements::BF16(v), DType::F32) => Storage::F32(map(v, bf16::to_f32)),
            (Elements::F16(v), DType::F32) => Storage::F32(map(v, f16::to_f32)),
            (e, d) => Storage::from_scalars(d, (0..e.len()).map(|i| e.get(i))),
        };
        Tensor {
            shape: self.shape.clone(),
            data: Data::Owned(storage),
        }
    }
}

/// Equal shapes and elements, whether owned or borrowed.
impl PartialEq for Tensor {
    fn eq(&self, other: &Tensor) -> bool {
        self.shape == other.shape && self.elements() == other.elements()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tensor rewritten in place keeps its elements' allocation; a count that does not
    /// match the shape is an error that leaves the tensor 1-D.
    #[test]
    fn rewrite_in_place() {
        let mut t = Tensor::from_i64(vec![2, 2], vec![1, 2, 3, 4]).unwrap();
        let before = t.as_i64().unwrap().as_ptr();
        t.rewrite(&[1, 3], |s| {
            if let Storage::I64(v) = s {
                v.truncate(3);
            }
        })
        .unwrap();
        assert_eq!(
            (t.shape(), t.as_i64().unwrap()),
            (&[1, 3][..], &[1, 2, 3][..])
        );
        assert_eq!(t.as_i64().unwrap().as_ptr(), before);
        let err = t.rewrite(&[2, 2], |_| {}).unwrap_err();
        assert_eq!((err.expected, err.got, t.shape()), (4, 3, &[3][..]));
        t.rewrite(&[2], |s| *s = Storage::F32(vec![0.5, 1.5]))
            .unwrap();
        assert_eq!(t.as_f32(), Some(&[0.5, 1.5][..]));
    }

    #[test]
    fn construction_and_cast() {
        assert!(Tensor::from_f32(vec![2, 2], vec![1.0; 3]).is_err());
        let t = Tensor::from_f32(vec![3], vec![1.5, -2.25, 1e6]).unwrap();
        let h = t.cast(DType::F8E4M3);
        assert_eq!(h.dtype(), DType::F8E4M3);
        assert_eq!(h.get(0), Scalar::Float(1.5));
        assert_eq!(
            h.get(2),
            Scalar::Float(448.0),
            "torch's e4m3fn cast saturates"
        );
        assert_eq!(t.cast(DType::I64).as_i64().unwrap(), &[1, -2, 1_000_000]);
        assert_eq!(
            t.cast(DType::BF16).cast(DType::F32).as_f32().unwrap()[1],
            -2.25
        );
    }

    /// The slice-to-slice casts give what the general path through `Scalar` gives, on rounding
    /// ties, the largest finite values, infinities, signed zeros and subnormals.
    #[test]
    fn float_casts_agree_with_the_general_path() {
        let values = vec![
            1.0 + 2f32.powi(-8),
            1.0 + 3.0 * 2f32.powi(-8),
            -65520.0,
            3.4e38,
            f32::INFINITY,
            -0.0,
            1e-40,
            6e-8,
            -2.25,
        ];
        let t = Tensor::from_f32(vec![values.len()], values).unwrap();
        let general =
            |t: &Tensor, d: DType| Storage::from_scalars(d, (0..t.numel()).map(|i| t.get(i)));
        for (from, to) in [
            (DType::F32, DType::BF16),
            (DType::F32, DType::F16),
            (DType::F32, DType::F32),
            (DType::BF16, DType::F32),
            (DType::F16, DType::F32),
            (DType::BF16, DType::BF16),
        ] {
            let src = t.cast(from);
            let fast = src.cast(to);
            assert_eq!(fast.dtype(), to);
            assert_eq!(
                fast.elements(),
                general(&src, to).elements(),
                "{from} -> {to}"
            );
        }
    }

    /// Little-endian bytes of `values`, starting at byte `at` of a shared buffer.
    fn shared_f32(values: &[f32], at: usize) -> SharedBytes {
        let mut bytes = vec![0xAAu8; at];
        bytes.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        SharedBytes::copy_of(&bytes)
    }

    #[test]
    fn a_borrowed_tensor_reads_its_bytes_in_place() {
        let values = [1.5f32, -0.0, f32::INFINITY, 3e-39, 7.0, -8.5];
        let bytes = shared_f32(&values, 64);
        let t = Tensor::borrowed(DType::F32, vec![2, 3], &bytes, 64..88).unwrap();
        let owned = Tensor::from_f32(vec![2, 3], values.to_vec()).unwrap();
        assert!(t.is_borrowed() && !owned.is_borrowed());
        assert_eq!(t, owned);
        let data = t.as_f32().unwrap();
        assert_eq!(data, &values);
        assert_eq!(
            data.as_ptr() as usize,
            bytes.as_slice()[64..].as_ptr() as usize,
            "no copy"
        );
        assert_eq!(t.get(4), Scalar::Float(7.0));
        assert_eq!(t.select_rows(&[1]), owned.select_rows(&[1]));
        assert_eq!(t.storage(), owned.storage());
        assert_eq!(t.cast(DType::BF16), owned.cast(DType::BF16));
        // Kept alive by the tensor after the caller's handle is gone.
        drop(bytes);
        assert_eq!(t.clone().as_f32().unwrap()[5], -8.5);
    }

    #[test]
    fn a_packed_tensor_unpacks_on_first_read_only() {
        let (rows, cols) = (3, 5);
        let values: Vec<bf16> = (0..rows * cols)
            .map(|i| bf16::from_f32(i as f32 - 7.5))
            .collect();
        let plain = Tensor::new(vec![rows, cols], Storage::BF16(values.clone())).unwrap();
        let transposed: Vec<bf16> = (0..rows * cols)
            .map(|i| values[(i % rows) * cols + i / rows])
            .collect();
        let as_stored = PackedBf16::pack(rows, cols, &values).unwrap();
        let as_kn = PackedBf16::pack(cols, rows, &transposed).unwrap();
        for forms in [
            [None, Some(as_stored.clone())],
            [Some(as_kn.clone()), None],
            [Some(as_kn.clone()), Some(as_stored.clone())],
        ] {
            let t = Tensor::packed(vec![rows, cols], forms.clone()).unwrap();
            assert_eq!((t.dtype(), t.numel()), (DType::BF16, rows * cols));
            assert_eq!(t.packed_form(true).is_some(), forms[1].is_some());
            assert!(!t.has_decoded_copy() && !t.is_borrowed());
            assert_eq!(t, plain);
            assert!(t.has_decoded_copy(), "unpacked once read");
        }
        let refuse = |shape: Vec<usize>, forms| Tensor::packed(shape, forms).unwrap_err();
        assert!(refuse(vec![rows, cols], [None, None])
            .to_string()
            .contains("packed forms do not hold"));
        refuse(vec![cols, rows], [None, Some(as_stored.clone())]);
        refuse(vec![rows, cols], [Some(as_stored), None]);
        refuse(vec![rows * cols], [Some(as_kn), None]);
    }

    #[test]
    fn bad_borrows_are_refused() {
        let bytes = shared_f32(&[1.0; 8], 0);
        let refuse = |dtype, shape: Vec<usize>, range| {
            Tensor::borrowed(dtype, shape, &bytes, range)
                .unwrap_err()
                .to_string()
        };
        assert!(refuse(DType::F32, vec![8], 0..36).contains("not inside the 32 shared bytes"));
        assert!(refuse(DType::F32, vec![3], 0..16).contains("16 bytes do not hold a f32"));
        assert!(refuse(DType::F32, vec![usize::MAX, 2], 0..16).contains("do not hold"));
        assert!(refuse(DType::F32, vec![2], 2..10).contains("misaligned"));
        assert!(refuse(DType::I64, vec![1], 4..12).contains("misaligned"));
        assert!(refuse(DType::Bool, vec![4], 0..4).contains("must be checked"));
        // Bytes every pattern of which is an element are fine anywhere.
        let t = Tensor::borrowed(DType::F8E4M3, vec![3], &bytes, 1..4).unwrap();
        assert_eq!(t.elements(), Elements::F8E4M3(&[0, 0x80, 0x3f]));
    }
}
