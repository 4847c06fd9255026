//! Host-side launchers of every kernel on a [`Device`]: argument checks (buffer sizes, shapes),
//! grid shapes, and the error flag some kernels set (out-of-range ids, integer division by
//! zero). Buffers hold elements in the storage types of [`crate::codegen::c_type`].

use crate::alloc::Buffer;
use crate::codegen::elementwise::Elementwise;
use crate::codegen::{Kernel, DECODE_HEADS, DECODE_TILE};
use crate::device::Device;
use crate::CudaError;
use cudarc::driver::{CudaFunction, LaunchArgs, LaunchConfig, PushKernelArg};
use kiln_ir::DType;

fn need(b: &Buffer, bytes: usize, what: &str) -> Result<(), CudaError> {
    if b.len() < bytes {
        return Err(CudaError::Args(format!(
            "{what}: buffer of {} bytes, {bytes} needed",
            b.len()
        )));
    }
    Ok(())
}

fn to_i32(v: usize, what: &str) -> Result<i32, CudaError> {
    i32::try_from(v).map_err(|_| CudaError::Args(format!("{what} = {v} exceeds i32")))
}

pub(crate) fn cfg(grid: (u32, u32, u32), block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub(crate) fn grid_1d(n: usize, block: u32) -> u32 {
    n.div_ceil(block as usize).clamp(1, 65535 * 8) as u32
}

/// Launches `f` with the arguments pushed by `push`.
pub(crate) fn launch<'a>(
    dev: &'a Device,
    f: &'a CudaFunction,
    config: LaunchConfig,
    push: impl FnOnce(&mut LaunchArgs<'a>),
) -> Result<(), CudaError> {
    let mut b = dev.stream().launch_builder(f);
    push(&mut b);
    // SAFETY: every launcher pushes exactly the kernel's parameters, in order and of the
    // kernel's types (device pointers for pointers, i32/i64/f32 scalars), and checks beforehand
    // that each buffer holds the elements the kernel reads or writes for the given sizes; a
    // provider's PTX kernel gets values `exec::external::pack` checked against the `.param`
    // list its PTX declares, each memref within its buffer.
    unsafe { b.launch(config) }?;
    Ok(())
}

/// A zeroed error flag for kernels that report bad input.
fn error_flag(dev: &Device) -> Result<Buffer, CudaError> {
    dev.filled(4, 0)
}

fn check_flag(dev: &Device, flag: &Buffer, what: &str) -> Result<(), CudaError> {
    if dev.download(flag)?.iter().any(|&b| b != 0) {
        return Err(CudaError::Args(what.to_string()));
    }
    Ok(())
}

/// The launch shape of a generated elementwise kernel over `n` elements: 256 threads per
/// block, one thread per pack of [`crate::codegen::elementwise::PACK`] elements (its loops
/// stride over the grid, so any grid is correct; this one has no idle threads).
pub(crate) fn elementwise_config(n: usize) -> LaunchConfig {
    cfg(
        (
            grid_1d(n.div_ceil(crate::codegen::elementwise::PACK), 256),
            1,
            1,
        ),
        256,
    )
}

/// Runs a generated elementwise kernel: `out` (n elements of the body's dtype) from `args`
/// laid out as planned (`meta` from [`crate::codegen::elementwise::Plan`]).
pub fn elementwise(
    dev: &Device,
    ew: &Elementwise,
    out: &Buffer,
    args: &[&Buffer],
    meta: &[i64],
    n: usize,
) -> Result<(), CudaError> {
    if args.len() != ew.args.len() {
        return Err(CudaError::Args(format!(
            "{} operands for a body over {}",
            args.len(),
            ew.args.len()
        )));
    }
    need(out, n * ew.out_dtype()?.size_bytes(), "fused output")?;
    let src = ew.source(dev.arch())?;
    let f = dev.function(&src, &src.entries[0])?;
    let meta_bytes: Vec<u8> = meta.iter().flat_map(|v| v.to_le_bytes()).collect();
    let meta_buf = dev.upload(&meta_bytes)?;
    let flag = error_flag(dev)?;
    let n64 = n as i64;
    launch(dev, &f, elementwise_config(n), |b| {
        b.arg(out.slice());
        for a in args {
            b.arg(a.slice());
        }
        b.arg(meta_buf.slice()).arg(&n64).arg(flag.slice());
    })?;
    // Only an integer division can set the flag; reading it waits for the kernel.
    let mut divides = false;
    ew.body.visit(&mut |e| {
        if let kiln_ir::Expr::Binary(kiln_ir::BinaryOp::Div, x, _) = e {
            divides |= x.dtype(&ew.args).is_ok_and(|d| d.is_int());
        }
    });
    if divides {
        check_flag(
            dev,
            &flag,
            "integer division by zero in a fused elementwise kernel",
        )?;
    }
    Ok(())
}

fn float_kernel(dev: &Device, k: Kernel, entry: &str) -> Result<CudaFunction, CudaError> {
    let name = k
        .entries()
        .into_iter()
        .find(|e| e.starts_with(entry))
        .ok_or_else(|| CudaError::Codegen(format!("{entry} not in {k:?}")))?;
    dev.function_cached(&format!("{k:?}/{name}"), || k.source(dev.arch()), &name)
}

/// Threads per block for a row of `n` elements.
fn row_block(n: usize) -> u32 {
    (n.div_ceil(32) * 32).clamp(32, 1024) as u32
}

/// Which row-wise operation.
#[derive(Clone, Copy)]
pub enum Rowwise<'a> {
    /// `x / sqrt(mean(x²) + eps) * w`.
    RmsNorm {
        /// The weight, `n` elements.
        w: &'a Buffer,
        /// Epsilon.
        eps: f32,
    },
    /// `(x - mean) / sqrt(var + eps) * w + b`.
    LayerNorm {
        /// The weight.
        w: &'a Buffer,
        /// The bias.
        b: &'a Buffer,
        /// Epsilon.
        eps: f32,
    },
    /// Softmax.
    Softmax,
}

/// Row-wise op over `rows` rows of `n` elements of storage dtype `dt`, `x` to `y`.
pub fn rowwise(
    dev: &Device,
    dt: DType,
    op: Rowwise<'_>,
    x: &Buffer,
    y: &Buffer,
    rows: usize,
    n: usize,
) -> Result<(), CudaError> {
    let bytes = rows * n * dt.size_bytes();
    need(x, bytes, "rowwise input")?;
    need(y, bytes, "rowwise output")?;
    let ni = to_i32(n, "row length")?;
    // Vector rows: ROW_VECTORS 16-byte vectors per thread (the kernel's fast path).
    let vec = 16 / dt.size_bytes();
    let block = if n.is_multiple_of(vec) {
        (n / vec)
            .div_ceil(crate::codegen::ROW_VECTORS * 32)
            .clamp(1, 32) as u32
            * 32
    } else {
        row_block(n)
    };
    let c = cfg((to_i32(rows, "rows")? as u32, 1, 1), block);
    match op {
        Rowwise::RmsNorm { w, eps } => {
            need(w, n * dt.size_bytes(), "rmsnorm weight")?;
            let f = float_kernel(dev, Kernel::Rowwise(dt), "rmsnorm")?;
            launch(dev, &f, c, |b| {
                b.arg(x.slice())
                    .arg(w.slice())
                    .arg(y.slice())
                    .arg(&ni)
                    .arg(&eps);
            })
        }
        Rowwise::LayerNorm { w, b: bias, eps } => {
            need(w, n * dt.size_bytes(), "layernorm weight")?;
            need(bias, n * dt.size_bytes(), "layernorm bias")?;
            let f = float_kernel(dev, Kernel::Rowwise(dt), "layernorm")?;
            launch(dev, &f, c, |b| {
                b.arg(x.slice())
                    .arg(w.slice())
                    .arg(bias.slice())
                    .arg(y.slice())
                    .arg(&ni)
                    .arg(&eps);
            })
        }
        Rowwise::Softmax => {
            let f = float_kernel(dev, Kernel::Rowwise(dt), "softmax")?;
            launch(dev, &f, c, |b| {
                b.arg(x.slice()).arg(y.slice()).arg(&ni);
            })
        }
    }
}

/// Rotate-half RoPE on `x[b, h, s, d]` with i64 positions `pos[b, s]` into f32 tables
/// `cos`/`sin[table_rows, d]`.
#[allow(clippy::too_many_arguments)]
pub fn rope(
    dev: &Device,
    dt: DType,
    x: &Buffer,
    pos: &Buffer,
    cos: &Buffer,
    sin: &Buffer,
    y: &Buffer,
    [b, h, s, d]: [usize; 4],
    table_rows: usize,
) -> Result<(), CudaError> {
    if !d.is_multiple_of(2) {
        return Err(CudaError::Args(format!("RoPE head dim {d} is odd")));
    }
    let n = b * h * s * d;
    need(x, n * dt.size_bytes(), "rope input")?;
    need(y, n * dt.size_bytes(), "rope output")?;
    need(pos, b * s * 8, "rope positions")?;
    need(cos, table_rows * d * 4, "rope cos table")?;
    need(sin, table_rows * d * 4, "rope sin table")?;
    let f = float_kernel(dev, Kernel::Rope(dt), "rope")?;
    let (hi, si, di) = (to_i32(h, "heads")?, to_i32(s, "seq")?, to_i32(d, "dim")?);
    let (rows, total) = (table_rows as i64, (n / 2) as i64);
    let flag = error_flag(dev)?;
    launch(dev, &f, cfg((grid_1d(n / 2, 256), 1, 1), 256), |a| {
        a.arg(x.slice())
            .arg(pos.slice())
            .arg(cos.slice())
            .arg(sin.slice())
            .arg(y.slice())
            .arg(&hi)
            .arg(&si)
            .arg(&di)
            .arg(&rows)
            .arg(&total)
            .arg(flag.slice());
    })?;
    check_flag(dev, &flag, "RoPE position outside the cos/sin tables")
}

/// Embedding gather: `out[r] = table[ids[r]]` for `rows` i64 ids into `table[vocab, hidden]`.
pub fn embedding(
    dev: &Device,
    dt: DType,
    table: &Buffer,
    ids: &Buffer,
    out: &Buffer,
    rows: usize,
    [vocab, hidden]: [usize; 2],
) -> Result<(), CudaError> {
    need(table, vocab * hidden * dt.size_bytes(), "embedding table")?;
    need(ids, rows * 8, "embedding ids")?;
    need(out, rows * hidden * dt.size_bytes(), "embedding output")?;
    let f = float_kernel(dev, Kernel::Embedding(dt), "embedding")?;
    let (v, hd) = (vocab as i64, to_i32(hidden, "hidden")?);
    let flag = error_flag(dev)?;
    launch(
        dev,
        &f,
        cfg(
            (to_i32(rows, "rows")? as u32, 1, 1),
            row_block(hidden).min(256),
        ),
        |a| {
            a.arg(table.slice())
                .arg(ids.slice())
                .arg(out.slice())
                .arg(&v)
                .arg(&hd)
                .arg(flag.slice());
        },
    )?;
    check_flag(dev, &flag, "token id outside the embedding table")
}

/// Greedy sampling: `out[r]` (i64) = argmax of row `r` of `x[rows, n]`.
pub fn argmax(
    dev: &Device,
    dt: DType,
    x: &Buffer,
    out: &Buffer,
    rows: usize,
    n: usize,
) -> Result<(), CudaError> {
    need(x, rows * n * dt.size_bytes(), "argmax input")?;
    need(out, rows * 8, "argmax output")?;
    let f = float_kernel(dev, Kernel::Argmax(dt), "argmax")?;
    let ni = to_i32(n, "row length")?;
    launch(
        dev,
        &f,
        cfg((to_i32(rows, "rows")? as u32, 1, 1), row_block(n)),
        |a| {
            a.arg(x.slice()).arg(out.slice()).arg(&ni);
        },
    )
}

/// The shape and attributes of an attention call (kiln's `attention` op, bf16).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Attention {
    /// Batch.
    pub batch: usize,
    /// Query heads.
    pub hq: usize,
    /// Key/value heads (divides `hq`).
    pub hkv: usize,
    /// Queries.
    pub sq: usize,
    /// Keys.
    pub sk: usize,
    /// Head dimension (64 or 128).
    pub d: usize,
    /// Multiplies `q·k`.
    pub scale: f32,
    /// Causal mask.
    pub causal: bool,
    /// Sliding window, 0 for none.
    pub window: usize,
}

impl Attention {
    /// Causal self-attention (as many keys as queries, one key/value head per query head) with
    /// the usual `1/√d` scale: the benchmarks' shape.
    pub fn causal(batch: usize, heads: usize, seq: usize, d: usize) -> Attention {
        Attention {
            batch,
            hq: heads,
            hkv: heads,
            sq: seq,
            sk: seq,
            d,
            scale: 1.0 / (d as f32).sqrt(),
            causal: true,
            window: 0,
        }
    }

    fn check(&self, q: &Buffer, k: &Buffer, v: &Buffer, out: &Buffer) -> Result<(), CudaError> {
        if self.hkv == 0 || !self.hq.is_multiple_of(self.hkv) {
            return Err(CudaError::Args(format!(
                "{} query heads over {} key/value heads",
                self.hq, self.hkv
            )));
        }
        if self.window > 0 && !self.causal {
            return Err(CudaError::Args("a sliding window needs causal".into()));
        }
        let qn = self.batch * self.hq * self.sq * self.d * 2;
        let kn = self.batch * self.hkv * self.sk * self.d * 2;
        need(q, qn, "attention q")?;
        need(k, kn, "attention k")?;
        need(v, kn, "attention v")?;
        need(out, qn, "attention output")
    }
}

/// An additive bf16 mask and its element strides over `[b, hq, sq, sk]` (0 on broadcast axes).
pub type Mask<'a> = Option<(&'a Buffer, [i64; 4])>;

fn mask_args(mask: Mask<'_>, a: &Attention) -> Result<(u64, [i64; 4]), CudaError> {
    match mask {
        None => Ok((0, [0; 4])),
        Some((m, st)) => {
            let dims = [a.batch, a.hq, a.sq, a.sk];
            let last: i64 = st.iter().zip(dims).map(|(s, d)| s * (d as i64 - 1)).sum();
            if st.iter().any(|&s| s < 0) {
                return Err(CudaError::Args("negative mask stride".into()));
            }
            need(m, (last as usize + 1) * 2, "attention mask")?;
            let (ptr, _sync) = cudarc::driver::DevicePtr::device_ptr(m.slice(), m.slice().stream());
            Ok((ptr, st))
        }
    }
}

/// The flash prefill kernel's tiling (`cu/attention.cu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefillTiles {
    /// 16 query rows per warp (64 per block), Q in registers, 64-key tiles.
    Rows16,
    /// 32 query rows per warp (128 per block), Q in shared memory, 32-key tiles.
    Rows32,
}

impl PrefillTiles {
    /// Every tiling, for tests and benchmarks.
    pub const ALL: [PrefillTiles; 2] = [PrefillTiles::Rows16, PrefillTiles::Rows32];

    fn entry(self) -> &'static str {
        match self {
            PrefillTiles::Rows16 => "attention_prefill",
            PrefillTiles::Rows32 => "attention_prefill_wide",
        }
    }

    /// Queries per block.
    fn rows(self) -> usize {
        match self {
            PrefillTiles::Rows16 => 64,
            PrefillTiles::Rows32 => 128,
        }
    }

    /// Dynamic shared memory: the K and V tiles, and the Q tile of `Rows32` (rows of
    /// `d + 8` bf16).
    fn shared_bytes(self, d: usize) -> usize {
        let rows = match self {
            PrefillTiles::Rows16 => 2 * 64,
            PrefillTiles::Rows32 => 2 * 32 + 128,
        };
        rows * (d + 8) * 2
    }
}

/// Flash attention prefill (bf16, head dim 64 or 128).
pub fn attention_prefill(
    dev: &Device,
    a: &Attention,
    q: &Buffer,
    k: &Buffer,
    v: &Buffer,
    mask: Mask<'_>,
    out: &Buffer,
) -> Result<(), CudaError> {
    attention_prefill_tiled(dev, a, q, k, v, mask, out, PrefillTiles::Rows16)
}

/// [`attention_prefill`] with a given tiling.
#[allow(clippy::too_many_arguments)]
pub fn attention_prefill_tiled(
    dev: &Device,
    a: &Attention,
    q: &Buffer,
    k: &Buffer,
    v: &Buffer,
    mask: Mask<'_>,
    out: &Buffer,
    tiles: PrefillTiles,
) -> Result<(), CudaError> {
    a.check(q, k, v, out)?;
    let f = float_kernel(dev, Kernel::AttentionPrefill(a.d), tiles.entry())?;
    let shared = tiles.shared_bytes(a.d);
    f.set_attribute(
        cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        shared as i32,
    )?;
    let (mptr, ms) = mask_args(mask, a)?;
    let (hq, hkv, sq, sk) = (
        to_i32(a.hq, "hq")?,
        to_i32(a.hkv, "hkv")?,
        to_i32(a.sq, "sq")?,
        to_i32(a.sk, "sk")?,
    );
    let (causal, window) = (i32::from(a.causal), to_i32(a.window, "window")?);
    let grid = (
        a.sq.div_ceil(tiles.rows()) as u32,
        a.hq as u32,
        a.batch as u32,
    );
    let config = LaunchConfig {
        shared_mem_bytes: shared as u32,
        ..cfg(grid, 128)
    };
    launch(dev, &f, config, |b| {
        b.arg(q.slice())
            .arg(k.slice())
            .arg(v.slice())
            .arg(&mptr)
            .arg(&ms[0])
            .arg(&ms[1])
            .arg(&ms[2])
            .arg(&ms[3])
            .arg(out.slice())
            .arg(&hq)
            .arg(&hkv)
            .arg(&sq)
            .arg(&sk)
            .arg(&a.scale)
            .arg(&causal)
            .arg(&window);
    })
}

/// A split count for [`attention_decode`] that fills `dev`: about 4 blocks per multiprocessor
/// (a block holds ≤ 46 KB of shared memory, 3–4 fit), each over a whole number of 64-key tiles.
pub fn decode_splits(dev: &Device, a: &Attention) -> Result<usize, CudaError> {
    let sms = dev.context().attribute(
        cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
    )?;
    let groups = (a.hq / a.hkv.max(1)).div_ceil(DECODE_HEADS).max(1);
    let blocks = (a.batch * a.hkv * groups).max(1);
    let tiles = a.sk.div_ceil(DECODE_TILE).max(1);
    let want = (4 * sms.max(1) as usize).div_ceil(blocks).clamp(1, tiles);
    Ok(tiles.div_ceil(tiles.div_ceil(want)))
}

/// Split-KV flash decoding (bf16, one query per head, head dim 64 or 128) with `splits`
/// key chunks ([`decode_splits`] picks a count that fills the device).
#[allow(clippy::too_many_arguments)]
pub fn attention_decode(
    dev: &Device,
    a: &Attention,
    q: &Buffer,
    k: &Buffer,
    v: &Buffer,
    mask: Mask<'_>,
    out: &Buffer,
    splits: usize,
) -> Result<(), CudaError> {
    if a.sq != 1 {
        return Err(CudaError::Args(format!(
            "decode attention takes one query, got {}",
            a.sq
        )));
    }
    a.check(q, k, v, out)?;
    let splits = splits.clamp(1, a.sk.max(1));
    let chunk = a.sk.div_ceil(splits).max(1);
    let f = float_kernel(dev, Kernel::AttentionDecode(a.d), "attention_decode_split")?;
    let g = float_kernel(
        dev,
        Kernel::AttentionDecode(a.d),
        "attention_decode_combine",
    )?;
    let (mptr, ms) = mask_args(mask, a)?;
    let heads = a.batch * a.hq;
    let part_o = dev.allocator().alloc(heads * splits * a.d * 4)?;
    let part_ml = dev.allocator().alloc(heads * splits * 3 * 4)?;
    let (hq, hkv, sk) = (
        to_i32(a.hq, "hq")?,
        to_i32(a.hkv, "hkv")?,
        to_i32(a.sk, "sk")?,
    );
    let (chunk, window, nsplit) = (
        to_i32(chunk, "chunk")?,
        to_i32(a.window, "window")?,
        to_i32(splits, "splits")?,
    );
    let groups = (a.hq / a.hkv).div_ceil(DECODE_HEADS);
    let grid = (splits as u32, (a.hkv * groups) as u32, a.batch as u32);
    launch(dev, &f, cfg(grid, 128), |b| {
        b.arg(q.slice())
            .arg(k.slice())
            .arg(v.slice())
            .arg(&mptr)
            .arg(&ms[0])
            .arg(&ms[1])
            .arg(&ms[3])
            .arg(part_o.slice())
            .arg(part_ml.slice())
            .arg(&hq)
            .arg(&hkv)
            .arg(&sk)
            .arg(&chunk)
            .arg(&a.scale)
            .arg(&window);
    })?;
    launch(
        dev,
        &g,
        cfg((a.hq as u32, a.batch as u32, 1), a.d as u32),
        |b| {
            b.arg(part_o.slice())
                .arg(part_ml.slice())
                .arg(out.slice())
                .arg(&hq)
                .arg(&nsplit);
        },
    )
}

/// Decode GEMV `y[n] = scale * W[n, k] · x[k]`, W bf16 or fp8 e4m3, x and y f32.
#[allow(clippy::too_many_arguments)]
pub fn gemv(
    dev: &Device,
    wt: DType,
    w: &Buffer,
    x: &Buffer,
    y: &Buffer,
    n: usize,
    k: usize,
    scale: f32,
) -> Result<(), CudaError> {
    need(w, n * k * wt.size_bytes(), "gemv weight")?;
    need(x, k * 4, "gemv x")?;
    need(y, n * 4, "gemv y")?;
    let f = float_kernel(dev, Kernel::Gemv(wt), "gemv")?;
    let (ni, ki) = (to_i32(n, "rows")?, to_i32(k, "k")?);
    launch(dev, &f, cfg((n.div_ceil(8) as u32, 1, 1), 256), |b| {
        b.arg(w.slice())
            .arg(x.slice())
            .arg(y.slice())
            .arg(&ni)
            .arg(&ki)
            .arg(&scale);
    })
}
