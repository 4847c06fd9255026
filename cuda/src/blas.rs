//! Matrix products through NVIDIA's libraries: cuBLAS `GemmEx` for f32 and bf16/f16 operands
//! (f32 accumulation, strict f32 for f32 operands: no TF32) and cuBLASLt for fp8 e4m3 with
//! per-tensor scales (sm_89 and later). Every product is row-major, as kiln's tensors are: the
//! calls map `C[m, n] = A · B` onto cuBLAS's column-major convention by computing `Cᵀ = Bᵀ·Aᵀ`.
//! The libraries are loaded at run time; their absence is a [`CudaError::Unavailable`].

use crate::alloc::Buffer;
use crate::device::Device;
use crate::CudaError;
use cudarc::cublas::{result as blas, sys as bsys, CudaBlas};
use cudarc::cublaslt::{result as lt, sys as lsys};
use cudarc::driver::DevicePtr;
use kiln_ir::DType;
use std::ffi::c_void;

/// cuBLAS and cuBLASLt handles on a device's stream, with cuBLASLt's workspace.
pub struct Blas {
    blas: CudaBlas,
    lt: lsys::cublasLtHandle_t,
    workspace: Buffer,
}

// SAFETY: the cuBLASLt handle is only used through `&self` methods that enqueue work on the
// device's one stream; cuBLAS handles may be used from any thread when calls do not overlap,
// which the executor's `&mut`-free, one-stream use guarantees as cudarc's CudaBlas does.
unsafe impl Send for Blas {}
// SAFETY: as above.
unsafe impl Sync for Blas {}

/// How a GEMM reads its operands and where it writes (all row-major, dense).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmShape {
    /// Rows of `A` and `C`.
    pub m: usize,
    /// Columns of `B` and `C`.
    pub n: usize,
    /// The reduced dimension.
    pub k: usize,
    /// `A` is stored `[k, m]` (read transposed).
    pub ta: bool,
    /// `B` is stored `[n, k]` (read transposed: a linear layer's weight).
    pub tb: bool,
    /// Independent products, one after another in each operand (0 strides broadcast).
    pub batch: usize,
    /// Elements between consecutive products' `A`, `B` (0: shared by every product).
    pub stride_a: usize,
    /// As `stride_a`, for `B`.
    pub stride_b: usize,
}

fn data_type(d: DType) -> Result<bsys::cudaDataType, CudaError> {
    Ok(match d {
        DType::F32 => bsys::cudaDataType::CUDA_R_32F,
        DType::BF16 => bsys::cudaDataType::CUDA_R_16BF,
        DType::F16 => bsys::cudaDataType::CUDA_R_16F,
        other => {
            return Err(CudaError::Args(format!(
                "cuBLAS GEMM operands of {other} (f32, bf16 or f16)"
            )))
        }
    })
}

fn blas_err(e: impl std::fmt::Debug) -> CudaError {
    CudaError::Driver(format!("cuBLAS: {e:?}"))
}

fn int(v: usize, what: &str) -> Result<i32, CudaError> {
    i32::try_from(v).map_err(|_| CudaError::Args(format!("GEMM {what} = {v} exceeds i32")))
}

fn ptr(b: &Buffer, offset_bytes: usize) -> u64 {
    let (p, _sync) = b.slice().device_ptr(b.slice().stream());
    p + offset_bytes as u64
}

fn need(b: &Buffer, bytes: usize, what: &str) -> Result<(), CudaError> {
    if b.len() < bytes {
        return Err(CudaError::Args(format!(
            "GEMM {what}: buffer of {} bytes, {bytes} needed",
            b.len()
        )));
    }
    Ok(())
}

impl Blas {
    /// Handles on `dev`'s stream; an error if cuBLAS or cuBLASLt cannot be loaded.
    pub fn new(dev: &Device) -> Result<Blas, CudaError> {
        // SAFETY: these only try to load the libraries and report whether they loaded.
        let present = unsafe { bsys::is_culib_present() && lsys::is_culib_present() };
        if !present {
            return Err(CudaError::Unavailable(
                "cuBLAS / cuBLASLt (libcublas.so, libcublasLt.so) were not found".into(),
            ));
        }
        let blas = CudaBlas::new(dev.stream().clone()).map_err(blas_err)?;
        let lt = lt::create_handle().map_err(blas_err)?;
        let workspace = dev.allocator().alloc(32 << 20)?;
        Ok(Blas {
            blas,
            lt,
            workspace,
        })
    }

    /// `C = A · B` (operands per `s`) with `A`, `B` of dtype `ab` (f32, bf16, f16) and `C` of
    /// `c_dtype` (f32 or `ab`), accumulating in f32. Buffers may start at byte offsets.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        s: &GemmShape,
        ab: DType,
        c_dtype: DType,
        a: (&Buffer, usize),
        b: (&Buffer, usize),
        c: (&Buffer, usize),
    ) -> Result<(), CudaError> {
        let (m, n, k) = (s.m, s.n, s.k);
        let batch = s.batch.max(1);
        let span = |stride: usize, one: usize| stride * (batch - 1) + one;
        need(a.0, a.1 + span(s.stride_a, m * k) * ab.size_bytes(), "A")?;
        need(b.0, b.1 + span(s.stride_b, n * k) * ab.size_bytes(), "B")?;
        need(c.0, c.1 + batch * m * n * c_dtype.size_bytes(), "C")?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        self.bind()?;
        let call = ColMajor::of(s);
        let op = |t: bool| {
            if t {
                bsys::cublasOperation_t::CUBLAS_OP_T
            } else {
                bsys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        // cuBLAS's A is our B and its B our A (see `ColMajor`).
        let (pa, pb, pc) = (ptr(b.0, b.1), ptr(a.0, a.1), ptr(c.0, c.1));
        let compute = bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F;
        let algo = bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT;
        // SAFETY: the buffers hold every element the product reads and writes (checked above
        // for the given shape, strides and dtypes); the pointers stay valid while the work is
        // queued because the executor keeps its buffers until the stream is synchronized.
        unsafe {
            blas::gemm_strided_batched_ex(
                *self.blas.handle(),
                op(call.transa),
                op(call.transb),
                int(call.m, "n")?,
                int(call.n, "m")?,
                int(call.k, "k")?,
                (&alpha) as *const f32 as *const c_void,
                pa as *const c_void,
                data_type(ab)?,
                int(call.lda, "lda")?,
                call.stride_a as i64,
                pb as *const c_void,
                data_type(ab)?,
                int(call.ldb, "ldb")?,
                call.stride_b as i64,
                (&beta) as *const f32 as *const c_void,
                pc as *mut c_void,
                data_type(c_dtype)?,
                int(call.ldc, "ldc")?,
                call.stride_c as i64,
                int(batch, "batch")?,
                compute,
                algo,
            )
        }
        .map_err(blas_err)
    }

    /// fp8 e4m3 `D[m, n] = (sa · A[m, k]) · (sb · B[n, k])ᵀ` in bf16, with the per-tensor
    /// scales `sa`, `sb` as f32 on the device (cuBLASLt, sm_89+).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_fp8(
        &self,
        [m, n, k]: [usize; 3],
        a: &Buffer,
        b: &Buffer,
        scale_a: &Buffer,
        scale_b: &Buffer,
        d: &Buffer,
    ) -> Result<(), CudaError> {
        need(a, m * k, "A")?;
        need(b, n * k, "B")?;
        need(d, m * n * 2, "D")?;
        need(scale_a, 4, "A scale")?;
        need(scale_b, 4, "B scale")?;
        let e4m3 = lsys::cudaDataType::CUDA_R_8F_E4M3;
        let bf16 = lsys::cudaDataType::CUDA_R_16BF;
        let (mi, ni, ki) = (m as u64, n as u64, k as u64);
        // Column-major, "TN": cuBLAS's A is our B read transposed ([k, n], ld k); its B is our
        // A ([k, m], ld k); D is [n, m], ld n.
        let desc = Desc(
            lt::create_matmul_desc(
                lsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                lsys::cudaDataType::CUDA_R_32F,
            )
            .map_err(blas_err)?,
        );
        let la = Layout(lt::create_matrix_layout(e4m3, ki, ni, k as i64).map_err(blas_err)?);
        let lb = Layout(lt::create_matrix_layout(e4m3, ki, mi, k as i64).map_err(blas_err)?);
        let ld = Layout(lt::create_matrix_layout(bf16, ni, mi, n as i64).map_err(blas_err)?);
        let pref = Pref(lt::create_matmul_pref().map_err(blas_err)?);
        let t: i32 = 1; // CUBLAS_OP_T
        let (sa, sb) = (ptr(scale_b, 0), ptr(scale_a, 0));
        let ws = self.workspace.len();
        // SAFETY: each attribute is written from a value of the type cuBLASLt documents for it
        // (an operation enum, a device pointer, a byte count), with its size.
        unsafe {
            use lsys::cublasLtMatmulDescAttributes_t as A;
            let set = |attr: A, p: *const c_void, size: usize| {
                lt::set_matmul_desc_attribute(desc.0, attr, p, size)
            };
            set(
                A::CUBLASLT_MATMUL_DESC_TRANSA,
                (&t) as *const _ as *const c_void,
                std::mem::size_of_val(&t),
            )
            .map_err(blas_err)?;
            set(
                A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER,
                (&sa) as *const u64 as *const c_void,
                8,
            )
            .map_err(blas_err)?;
            set(
                A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER,
                (&sb) as *const u64 as *const c_void,
                8,
            )
            .map_err(blas_err)?;
            lt::set_matmul_pref_attribute(
                pref.0,
                lsys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&ws) as *const usize as *const c_void,
                std::mem::size_of::<usize>(),
            )
            .map_err(blas_err)?;
        }
        let (alpha, beta) = (1.0f32, 0.0f32);
        self.bind()?;
        let stream = self.blas_stream();
        // SAFETY: the descriptors were created above and outlive the calls; the buffers hold
        // the elements of the checked sizes; the workspace is this handle's own.
        unsafe {
            let heuristic =
                lt::get_matmul_algo_heuristic(self.lt, desc.0, la.0, lb.0, ld.0, ld.0, pref.0)
                    .map_err(blas_err)?;
            lt::matmul(
                self.lt,
                desc.0,
                (&alpha) as *const f32 as *const c_void,
                (&beta) as *const f32 as *const c_void,
                ptr(b, 0) as *const c_void,
                la.0,
                ptr(a, 0) as *const c_void,
                lb.0,
                ptr(d, 0) as *const c_void,
                ld.0,
                ptr(d, 0) as *mut c_void,
                ld.0,
                (&heuristic.algo) as *const _,
                ptr(&self.workspace, 0) as *mut c_void,
                ws,
                stream as *mut _,
            )
            .map_err(blas_err)
        }
    }

    /// Makes the device's context current on this thread (the libraries use the current one).
    fn bind(&self) -> Result<(), CudaError> {
        Ok(self.workspace.slice().stream().context().bind_to_thread()?)
    }

    fn blas_stream(&self) -> lsys::cudaStream_t {
        self.workspace.slice().stream().cu_stream() as lsys::cudaStream_t
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: the handle was created by `new` and is destroyed once; a failure here can
        // only leak it.
        let _ = unsafe { lt::destroy_handle(self.lt) };
    }
}

/// A row-major `C[m, n] = op(A) · op(B)` as cuBLAS's column-major call: cuBLAS computes
/// `Cᵀ[n, m] = op(B)ᵀ · op(A)ᵀ`, so its first operand is our `B` and its second our `A`; a
/// row-major `[r, c]` matrix is a column-major `[c, r]` one with leading dimension `c`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ColMajor {
    transa: bool,
    transb: bool,
    m: usize,
    n: usize,
    k: usize,
    lda: usize,
    ldb: usize,
    ldc: usize,
    stride_a: usize,
    stride_b: usize,
    stride_c: usize,
}

impl ColMajor {
    fn of(s: &GemmShape) -> ColMajor {
        ColMajor {
            transa: s.tb,
            transb: s.ta,
            m: s.n,
            n: s.m,
            k: s.k,
            lda: if s.tb { s.k } else { s.n },
            ldb: if s.ta { s.m } else { s.k },
            ldc: s.n,
            stride_a: s.stride_b,
            stride_b: s.stride_a,
            stride_c: s.m * s.n,
        }
    }
}

/// Owners of cuBLASLt descriptors, destroyed on drop.
struct Desc(lsys::cublasLtMatmulDesc_t);
struct Layout(lsys::cublasLtMatrixLayout_t);
struct Pref(lsys::cublasLtMatmulPreference_t);

impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by cuBLASLt and destroyed once.
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}
impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by cuBLASLt and destroyed once.
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}
impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created by cuBLASLt and destroyed once.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// cuBLAS's column-major `C = op(A) · op(B)` with leading dimensions and batch strides,
    /// written out as its documentation defines it.
    fn cublas_gemm(c: &ColMajor, batch: usize, a: &[f64], b: &[f64]) -> Vec<f64> {
        let mut out = vec![f64::NAN; c.stride_c * batch];
        for p in 0..batch {
            for i in 0..c.m {
                for j in 0..c.n {
                    let mut acc = 0.0;
                    for l in 0..c.k {
                        let av = if c.transa {
                            a[p * c.stride_a + i * c.lda + l]
                        } else {
                            a[p * c.stride_a + l * c.lda + i]
                        };
                        let bv = if c.transb {
                            b[p * c.stride_b + l * c.ldb + j]
                        } else {
                            b[p * c.stride_b + j * c.ldb + l]
                        };
                        acc += av * bv;
                    }
                    out[p * c.stride_c + j * c.ldc + i] = acc;
                }
            }
        }
        out
    }

    #[test]
    fn row_major_products_map_onto_column_major_calls() {
        let (m, n, k) = (3, 5, 7);
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            for (batch, shared_b) in [(1, false), (2, false), (2, true)] {
                let s = GemmShape {
                    m,
                    n,
                    k,
                    ta,
                    tb,
                    batch,
                    stride_a: m * k,
                    stride_b: if shared_b { 0 } else { n * k },
                };
                let a: Vec<f64> = (0..batch * m * k)
                    .map(|i| (i as f64 * 0.37).sin())
                    .collect();
                let b: Vec<f64> = (0..batch * n * k)
                    .map(|i| (i as f64 * 0.91).cos())
                    .collect();
                // Row-major reference: A is [m, k] (or [k, m] when ta), B is [k, n] (or [n, k]).
                let mut want = vec![0.0; batch * m * n];
                for p in 0..batch {
                    let (ao, bo) = (p * s.stride_a, p * s.stride_b);
                    for i in 0..m {
                        for j in 0..n {
                            want[p * m * n + i * n + j] = (0..k)
                                .map(|l| {
                                    let av = if ta {
                                        a[ao + l * m + i]
                                    } else {
                                        a[ao + i * k + l]
                                    };
                                    let bv = if tb {
                                        b[bo + j * k + l]
                                    } else {
                                        b[bo + l * n + j]
                                    };
                                    av * bv
                                })
                                .sum();
                        }
                    }
                }
                // cuBLAS's first operand is our B, its second our A.
                let got = cublas_gemm(&ColMajor::of(&s), batch, &b, &a);
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() < 1e-12,
                        "ta {ta} tb {tb} batch {batch}: {g} vs {w}"
                    );
                }
            }
        }
    }
}
