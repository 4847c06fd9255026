//! The run loop of [`CudaGraph`]: binds sizes, walks the plan's steps launching each one's
//! kernel on the device's stream, and returns the outputs as device values.

use super::select::Step;
use super::{backend_err, external, host, kernels, CudaGraph, DevTensor, Prepared, PtxEntry};
use crate::alloc::Buffer;
use crate::blas::GemmShape;
use crate::codegen::elementwise::{broadcast_strides, Elementwise};
use crate::launch::{self, Attention, Rowwise};
use crate::CudaError;
use cudarc::driver::{sys, DevicePtr, PushKernelArg};
use kiln_ir::{BinaryOp, Bindings, DType, Expr, Node, Op, ValueId};
use kiln_runtime::executor::Value;
use kiln_runtime::reference::{self, ExecError, ParamSource};
use kiln_runtime::Tensor;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

/// Runs the graph; with `wanted`, only the steps those outputs need, returning only them.
pub(super) fn run(
    g: &CudaGraph,
    mut inputs: HashMap<String, Value>,
    params: &dyn ParamSource,
    wanted: Option<&[&str]>,
) -> Result<HashMap<String, Value>, ExecError> {
    let types = inputs
        .iter()
        .map(|(k, v)| (k.clone(), (v.dtype(), v.shape().to_vec())))
        .collect();
    let env = reference::bind_types(&g.graph, &types, params)?;
    // The parameters on the device, locked for the run (uploads happen only at compile time).
    let held = g.backend.params.lock().unwrap_or_else(|e| e.into_inner());
    let mut vals: Vec<Option<DevTensor>> = vec![None; g.graph.nodes().len()];
    let nodes = g.graph.nodes();
    let needed = wanted.map(|w| {
        let w = kiln_runtime::executor::output_positions(&g.graph, w);
        g.needed.get(&g.graph, &w, |i| {
            let step = &g.plan.steps[i];
            step.operands(&nodes[i])
                .iter()
                .chain(&nodes[i].inputs)
                .map(|v| v.index())
                .collect()
        })
    });
    for (id, node) in g.graph.iter() {
        let i = id.index();
        if needed.as_ref().is_some_and(|n| !n[i]) {
            continue;
        }
        let step = &g.plan.steps[i];
        let started = g.profile.as_ref().map(|_| Instant::now());
        match (step, &node.op) {
            (Step::Skip, _) => {}
            (Step::Const, _) => {
                vals[i] = g.consts.get(&i).cloned();
            }
            (Step::Source, Op::Input { name }) => {
                let v = inputs
                    .remove(name)
                    .ok_or_else(|| ExecError::MissingInput(name.clone()))?;
                vals[i] = Some(g.input(v)?);
            }
            (Step::Source, Op::Param { name }) => {
                if let (Some(buf), Some(t)) = (held.get(name), params.get(name)) {
                    vals[i] = Some(g.tensor(buf.clone(), t.dtype(), t.shape().to_vec()));
                }
            }
            _ => {
                let shape = reference::node_shape(id, node, &env)?;
                let cx = StepCx {
                    g,
                    id,
                    node,
                    env: &env,
                    vals: &vals,
                    held: &held,
                };
                let v = cx.eval(step, shape)?;
                vals[i] = Some(v);
            }
        }
        if let (Some(p), Some(t)) = (&g.profile, started) {
            if !matches!(step, Step::Source | Step::Skip | Step::Const) {
                g.backend.dev.synchronize().map_err(backend_err)?;
                p.record(step.kind(), t.elapsed().as_secs_f64());
            }
        }
        if !matches!(step, Step::Source | Step::Skip | Step::Const) {
            for v in step.operands(node) {
                if g.last_use[v.index()] == i {
                    vals[v.index()] = None;
                }
            }
        }
    }
    let mut out = HashMap::new();
    for o in g.graph.outputs() {
        if wanted.is_some_and(|w| !w.contains(&o.name.as_str())) {
            continue;
        }
        let v = vals[o.value.index()]
            .clone()
            .ok_or_else(|| ExecError::ShapeMismatch {
                node: o.value,
                op: "output",
                detail: format!("output {:?} has no value", o.name),
            })?;
        out.insert(o.name.clone(), Value::Device(Arc::new(v)));
    }
    Ok(out)
}

impl CudaGraph {
    pub(super) fn tensor(&self, buf: Arc<Buffer>, dtype: DType, shape: Vec<usize>) -> DevTensor {
        DevTensor {
            buf,
            dtype,
            shape,
            backend: self.backend.clone(),
        }
    }

    fn input(&self, v: Value) -> Result<DevTensor, ExecError> {
        if let Value::Device(d) = &v {
            if let Some(t) = d.as_any().downcast_ref::<DevTensor>() {
                if Arc::ptr_eq(&t.backend, &self.backend) {
                    return Ok(t.clone());
                }
            }
        }
        self.upload(&v.into_host()?)
    }

    fn upload(&self, t: &Tensor) -> Result<DevTensor, ExecError> {
        let buf = self
            .backend
            .dev
            .upload(&host::to_bytes(t))
            .map_err(backend_err)?;
        Ok(self.tensor(Arc::new(buf), t.dtype(), t.shape().to_vec()))
    }

    fn alloc(&self, dtype: DType, shape: Vec<usize>) -> Result<DevTensor, ExecError> {
        let n: usize = shape.iter().product();
        let buf = self
            .backend
            .dev
            .allocator()
            .alloc(n * dtype.size_bytes())
            .map_err(backend_err)?;
        Ok(self.tensor(Arc::new(buf), dtype, shape))
    }
}

fn ptr(t: &DevTensor) -> u64 {
    let (p, _sync) = t.buf.slice().device_ptr(t.buf.slice().stream());
    p
}

/// What one step sees.
struct StepCx<'a> {
    g: &'a CudaGraph,
    id: ValueId,
    node: &'a Node,
    env: &'a Bindings,
    vals: &'a [Option<DevTensor>],
    held: &'a HashMap<String, Arc<Buffer>>,
}

impl StepCx<'_> {
    fn mismatch(&self, detail: impl Into<String>) -> ExecError {
        ExecError::ShapeMismatch {
            node: self.id,
            op: self.node.op.name(),
            detail: detail.into(),
        }
    }

    fn val(&self, v: ValueId) -> Result<&DevTensor, ExecError> {
        self.vals[v.index()]
            .as_ref()
            .ok_or_else(|| self.mismatch(format!("operand {v} is not on the device")))
    }

    fn operand(&self, k: usize) -> Result<&DevTensor, ExecError> {
        let v = *self
            .node
            .inputs
            .get(k)
            .ok_or_else(|| self.mismatch(format!("no operand {k}")))?;
        self.val(v)
    }

    fn eval(&self, step: &Step, shape: Vec<usize>) -> Result<DevTensor, ExecError> {
        let done = match step {
            Step::Alias => {
                let x = self.operand(0)?;
                return Ok(self.g.tensor(x.buf.clone(), x.dtype, shape));
            }
            Step::Layout => self.layout(&shape)?,
            Step::Concat => self.concat(&shape)?,
            Step::Elementwise(body) => {
                let args: Vec<&DevTensor> = (0..self.node.inputs.len())
                    .map(|k| self.operand(k))
                    .collect::<Result<_, _>>()?;
                self.elementwise(body, &args, &shape)?
            }
            Step::Linear {
                weight,
                transposed,
                input,
            } => self.linear(weight, *transposed, *input, &shape)?,
            Step::MatMul { ta, tb } => self.matmul(*ta, *tb, &shape)?,
            Step::RmsNorm { eps } => {
                let w = self.operand(1)?;
                self.rowwise(
                    Rowwise::RmsNorm {
                        w: &w.buf,
                        eps: *eps,
                    },
                    &shape,
                )?
            }
            Step::LayerNorm { eps } => {
                let (w, b) = (self.operand(1)?, self.operand(2)?);
                let op = Rowwise::LayerNorm {
                    w: &w.buf,
                    b: &b.buf,
                    eps: *eps,
                };
                self.rowwise(op, &shape)?
            }
            Step::Softmax => self.rowwise(Rowwise::Softmax, &shape)?,
            Step::Attention {
                qkv,
                scale,
                causal,
                window,
            } => self.attention(*qkv, *scale, *causal, *window, &shape)?,
            Step::Embedding => self.embedding(&shape)?,
            Step::External(native) => match self.external(native, &shape)? {
                Some(t) => Some(t),
                None => return self.eval(native, shape),
            },
            Step::Host | Step::Source | Step::Skip | Step::Const => None,
        };
        match done {
            Some(t) => Ok(t),
            None => self.on_host(),
        }
    }

    /// The reference op on the host.
    fn on_host(&self) -> Result<DevTensor, ExecError> {
        let args = (0..self.node.inputs.len())
            .map(|k| {
                let v = self.operand(k)?;
                host_of(v)
            })
            .collect::<Result<Vec<Tensor>, _>>()?;
        let refs: Vec<&Tensor> = args.iter().collect();
        let t = reference::eval_node(self.id, self.node, self.env, &refs)?;
        self.g.upload(&t)
    }

    /// A generated elementwise kernel over `args` (broadcast) into a new value of `shape`.
    fn elementwise(
        &self,
        body: &Expr,
        args: &[&DevTensor],
        shape: &[usize],
    ) -> Result<Option<DevTensor>, ExecError> {
        let types: Vec<(DType, &[usize])> =
            args.iter().map(|a| (a.dtype, a.shape.as_slice())).collect();
        let Some((ew, meta)) = kernels::elementwise(body, &types, shape) else {
            return Ok(None);
        };
        let ptrs: Vec<u64> = args.iter().map(|a| ptr(a)).collect();
        self.launch_elementwise(ew, meta, &ptrs, shape)
    }

    /// Launches `ew` (compiled and its `meta` uploaded once per distinct sizes) on operand
    /// pointers `ptrs` into a new value of `shape`.
    fn launch_elementwise(
        &self,
        ew: Elementwise,
        meta: Vec<i64>,
        ptrs: &[u64],
        shape: &[usize],
    ) -> Result<Option<DevTensor>, ExecError> {
        let Ok(out_dtype) = ew.out_dtype() else {
            return Ok(None);
        };
        let dev = &self.g.backend.dev;
        let key = (ew, meta);
        let prepared = {
            let cached = self
                .g
                .kernels
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&key)
                .cloned();
            match cached {
                Some(p) => p,
                None => {
                    let (ew, meta) = &key;
                    let src = match ew.source(dev.arch()) {
                        Ok(s) => s,
                        Err(CudaError::Codegen(_)) => return Ok(None),
                        Err(e) => return Err(backend_err(e)),
                    };
                    let f = dev.function(&src, &src.entries[0]).map_err(backend_err)?;
                    let bytes: Vec<u8> = meta.iter().flat_map(|v| v.to_le_bytes()).collect();
                    let meta_buf = dev.upload(&bytes).map_err(backend_err)?;
                    let mut divides = false;
                    ew.body.visit(&mut |e| {
                        if let Expr::Binary(BinaryOp::Div, x, _) = e {
                            divides |= x.dtype(&ew.args).is_ok_and(|d| d.is_int());
                        }
                    });
                    let p = Arc::new(Prepared {
                        f,
                        meta: meta_buf,
                        divides,
                    });
                    self.g
                        .kernels
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(key.clone(), p.clone());
                    p
                }
            }
        };
        let out = self.g.alloc(out_dtype, shape.to_vec())?;
        let n = out.numel();
        if n == 0 {
            return Ok(Some(out));
        }
        let n64 = n as i64;
        let out_ptr = ptr(&out);
        // Only a kernel dividing integers can set the flag: it gets a fresh zeroed one.
        let fresh = if prepared.divides {
            Some(dev.filled(4, 0).map_err(backend_err)?)
        } else {
            None
        };
        let flag = fresh.as_ref().unwrap_or(&self.g.backend.flag);
        launch::launch(dev, &prepared.f, launch::elementwise_config(n), |b| {
            b.arg(&out_ptr);
            for p in ptrs {
                b.arg(p);
            }
            b.arg(prepared.meta.slice()).arg(&n64).arg(flag.slice());
        })
        .map_err(backend_err)?;
        if let Some(flag) = &fresh {
            if dev
                .download(flag)
                .map_err(backend_err)?
                .iter()
                .any(|&b| b != 0)
            {
                return Err(ExecError::DivisionByZero { node: self.id });
            }
        }
        Ok(Some(out))
    }

    /// Permute, slice or expand: a strided copy (the identity body over a strided operand).
    fn layout(&self, shape: &[usize]) -> Result<Option<DevTensor>, ExecError> {
        let x = self.operand(0)?;
        let Some(((ew, meta), offset)) =
            kernels::layout(&self.node.op, self.env, x.dtype, &x.shape, shape)?
        else {
            return Ok(None);
        };
        let base = ptr(x) + (offset as u64) * x.dtype.size_bytes() as u64;
        self.launch_elementwise(ew, meta, &[base], shape)
    }

    /// `concat`: each operand's rows copied into place with 2-D copies.
    fn concat(&self, shape: &[usize]) -> Result<Option<DevTensor>, ExecError> {
        let Op::Concat { axis } = self.node.op else {
            return Ok(None);
        };
        let out = self.g.alloc(self.node.ty.dtype, shape.to_vec())?;
        let elt = out.dtype.size_bytes();
        let outer: usize = shape[..axis].iter().product();
        let out_row: usize = shape[axis..].iter().product::<usize>() * elt;
        let mut at = 0usize;
        for k in 0..self.node.inputs.len() {
            let x = self.operand(k)?;
            let row: usize = x.shape[axis..].iter().product::<usize>() * elt;
            if row > 0 && outer > 0 {
                let copy = sys::CUDA_MEMCPY2D {
                    srcXInBytes: 0,
                    srcY: 0,
                    srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
                    srcHost: std::ptr::null(),
                    srcDevice: ptr(x),
                    srcArray: std::ptr::null_mut(),
                    srcPitch: row,
                    dstXInBytes: at,
                    dstY: 0,
                    dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
                    dstHost: std::ptr::null_mut(),
                    dstDevice: ptr(&out),
                    dstArray: std::ptr::null_mut(),
                    dstPitch: out_row,
                    WidthInBytes: row,
                    Height: outer,
                };
                if x.bytes() < row * outer || at + row > out_row {
                    return Err(self.mismatch("concat operand sizes"));
                }
                let dev = &self.g.backend.dev;
                dev.context()
                    .bind_to_thread()
                    .map_err(|e| backend_err(e.into()))?;
                let stream = dev.stream().cu_stream();
                // SAFETY: source and destination are device buffers holding `outer` rows of
                // `row` bytes at pitches `row` and `out_row` (checked above); the copy is
                // queued on the stream every kernel of this graph uses.
                unsafe { sys::cuMemcpy2DAsync_v2(&copy, stream) }
                    .result()
                    .map_err(|e| backend_err(e.into()))?;
            }
            at += row;
        }
        Ok(Some(out))
    }

    fn linear(
        &self,
        weight: &str,
        transposed: bool,
        input: ValueId,
        shape: &[usize],
    ) -> Result<Option<DevTensor>, ExecError> {
        let x = self.val(input)?;
        let Some(w) = self.held.get(weight) else {
            return Ok(None);
        };
        let wnode = self.node.inputs[1];
        let wd = match self.g.graph.node(wnode).map(|n| (&n.op, n.ty.dtype)) {
            Some((Op::Cast { .. }, _)) => self
                .g
                .graph
                .node(self.g.graph.node(wnode).map_or(wnode, |n| n.inputs[0]))
                .map(|n| n.ty.dtype),
            Some((_, d)) => Some(d),
            None => None,
        };
        let k = x.shape.last().copied().unwrap_or(0);
        let n = shape.last().copied().unwrap_or(0);
        if k == 0 || x.numel() % k != 0 || (x.numel() / k) * n != shape.iter().product::<usize>() {
            return Ok(None);
        }
        let m = x.numel() / k;
        let out = self.g.alloc(DType::F32, shape.to_vec())?;
        let blas = &self.g.backend.blas;
        let dev = &self.g.backend.dev;
        let gemm = |ab: DType, a: &Buffer, b: &Buffer| {
            let s = GemmShape {
                m,
                n,
                k,
                ta: false,
                tb: transposed,
                batch: 1,
                stride_a: 0,
                stride_b: 0,
            };
            blas.gemm(&s, ab, DType::F32, (a, 0), (b, 0), (&out.buf, 0))
                .map_err(backend_err)
        };
        match (wd, x.dtype) {
            (Some(wd), xd) if wd == xd && matches!(xd, DType::F32 | DType::BF16 | DType::F16) => {
                gemm(xd, &x.buf, w)?
            }
            (Some(DType::F8E4M3), DType::F32) if transposed && m == 1 => {
                launch::gemv(dev, DType::F8E4M3, w, &x.buf, &out.buf, n, k, 1.0)
                    .map_err(backend_err)?
            }
            (Some(DType::F8E4M3), DType::F32) => {
                // fp8 weights with several rows: widen the weight to bf16, round the rows.
                let wt = self.g.tensor(w.clone(), DType::F8E4M3, vec![n * k]);
                let to_bf16 = kernels::cast(DType::BF16);
                let (Some(wb), Some(xb)) = (
                    self.elementwise(&to_bf16, &[&wt], &[n * k])?,
                    self.elementwise(&to_bf16, &[x], &x.shape)?,
                ) else {
                    return Ok(None);
                };
                gemm(DType::BF16, &xb.buf, &wb.buf)?
            }
            _ => return Ok(None),
        }
        Ok(Some(out))
    }

    /// A batched product of two dense f32 activations (batch dims equal, or one of them 1).
    fn matmul(&self, ta: bool, tb: bool, shape: &[usize]) -> Result<Option<DevTensor>, ExecError> {
        let (a, b) = (self.operand(0)?, self.operand(1)?);
        if a.dtype != DType::F32 || b.dtype != DType::F32 || a.shape.len() < 2 || b.shape.len() < 2
        {
            return Ok(None);
        }
        let (ra, rb) = (a.shape.len(), b.shape.len());
        let (m, k) = if ta {
            (a.shape[ra - 1], a.shape[ra - 2])
        } else {
            (a.shape[ra - 2], a.shape[ra - 1])
        };
        let n = if tb { b.shape[rb - 2] } else { b.shape[rb - 1] };
        let (ba, bb) = (
            a.shape[..ra - 2].iter().product::<usize>(),
            b.shape[..rb - 2].iter().product::<usize>(),
        );
        let batch = ba.max(bb);
        if (ba != batch && ba != 1)
            || (bb != batch && bb != 1)
            || batch * m * n != shape.iter().product::<usize>()
        {
            return Ok(None);
        }
        let out = self.g.alloc(DType::F32, shape.to_vec())?;
        let s = GemmShape {
            m,
            n,
            k,
            ta,
            tb,
            batch,
            stride_a: if ba == 1 { 0 } else { m * k },
            stride_b: if bb == 1 { 0 } else { n * k },
        };
        self.g
            .backend
            .blas
            .gemm(
                &s,
                DType::F32,
                DType::F32,
                (&a.buf, 0),
                (&b.buf, 0),
                (&out.buf, 0),
            )
            .map_err(backend_err)?;
        Ok(Some(out))
    }

    fn rowwise(&self, op: Rowwise<'_>, shape: &[usize]) -> Result<Option<DevTensor>, ExecError> {
        let x = self.operand(0)?;
        let n = shape.last().copied().unwrap_or(0);
        if n == 0 || x.shape != shape || x.dtype != self.node.ty.dtype {
            return Ok(None);
        }
        let out = self.g.alloc(x.dtype, shape.to_vec())?;
        launch::rowwise(
            &self.g.backend.dev,
            x.dtype,
            op,
            &x.buf,
            &out.buf,
            x.numel() / n,
            n,
        )
        .map_err(backend_err)?;
        Ok(Some(out))
    }

    fn attention(
        &self,
        [q, k, v]: [ValueId; 3],
        scale: f32,
        causal: bool,
        window: usize,
        shape: &[usize],
    ) -> Result<Option<DevTensor>, ExecError> {
        let (q, k, v) = (self.val(q)?, self.val(k)?, self.val(v)?);
        let (&[b, hq, sq, d], &[_, hkv, sk, dk], &[_, _, _, dv]) =
            (q.shape.as_slice(), k.shape.as_slice(), v.shape.as_slice())
        else {
            return Ok(None);
        };
        if dk != d || dv != d || hkv == 0 || !hq.is_multiple_of(hkv) || (window > 0 && !causal) {
            return Ok(None);
        }
        let a = Attention {
            batch: b,
            hq,
            hkv,
            sq,
            sk,
            d,
            scale,
            causal,
            window,
        };
        let full = [b, hq, sq, sk];
        let mask = match self.node.inputs.get(3) {
            Some(&m) => {
                let m = self.val(m)?;
                let Some(st) = broadcast_strides(&m.shape, &full) else {
                    return Ok(None);
                };
                let to_bf16 = kernels::mask_to_bf16(m.dtype);
                let Some(mb) = self.elementwise(&to_bf16, &[m], &m.shape.clone())? else {
                    return Ok(None);
                };
                Some((mb, [st[0], st[1], st[2], st[3]]))
            }
            None => None,
        };
        let out = self.g.alloc(DType::BF16, vec![b, hq, sq, d])?;
        let dev = &self.g.backend.dev;
        let m = mask.as_ref().map(|(t, st)| (t.buf.as_ref(), *st));
        let r = if sq == 1 {
            let splits = launch::decode_splits(dev, &a).map_err(backend_err)?;
            launch::attention_decode(dev, &a, &q.buf, &k.buf, &v.buf, m, &out.buf, splits)
        } else {
            launch::attention_prefill(dev, &a, &q.buf, &k.buf, &v.buf, m, &out.buf)
        };
        r.map_err(backend_err)?;
        self.elementwise(&kernels::cast(DType::F32), &[&out], shape)
    }

    /// The provider's launches for the node into a new f32 value of `shape`; `None` (the
    /// reason recorded) when it has none for these operands.
    fn external(&self, native: &Step, shape: &[usize]) -> Result<Option<DevTensor>, ExecError> {
        let Some(provider) = &self.g.provider else {
            return Ok(None);
        };
        let args: Vec<&DevTensor> = (0..self.node.inputs.len())
            .map(|k| self.operand(k))
            .collect::<Result<_, _>>()?;
        if let Some(a) = args.iter().find(|a| a.dtype != DType::F32) {
            provider.fell_back(
                native.kind(),
                format!("a {} operand on the device", a.dtype),
            );
            return Ok(None);
        }
        let shapes: Vec<&[usize]> = args.iter().map(|a| a.shape.as_slice()).collect();
        let dev = &self.g.backend.dev;
        let Some(launches) = provider.launches(native.kind(), &self.node.op, &shapes, dev.arch())
        else {
            return Ok(None);
        };
        let out = self.g.alloc(DType::F32, shape.to_vec())?;
        let mut buffers: Vec<(u64, usize)> = args.iter().map(|a| (ptr(a), a.numel())).collect();
        buffers.push((ptr(&out), out.numel()));
        // Load and check every launch before the first runs, so a refusal leaves no partial work.
        let mut ready = Vec::with_capacity(launches.len());
        for l in &launches {
            let entry = self.ptx_entry(l).map_err(backend_err)?;
            match external::pack(l, &entry.params, &buffers) {
                Ok(values) => ready.push((entry, values, l)),
                Err(e) => {
                    provider.fell_back(native.kind(), e.to_string());
                    return Ok(None);
                }
            }
        }
        for (entry, values, l) in &ready {
            if l.grid.contains(&0) || l.block.contains(&0) {
                continue;
            }
            let config = cudarc::driver::LaunchConfig {
                grid_dim: (l.grid[0], l.grid[1], l.grid[2]),
                block_dim: (l.block[0], l.block[1], l.block[2]),
                shared_mem_bytes: 0,
            };
            launch::launch(dev, &entry.f, config, |b| {
                for v in values {
                    match v {
                        external::ParamValue::B32(x) => b.arg(x),
                        external::ParamValue::B64(x) => b.arg(x),
                    };
                }
            })
            .map_err(backend_err)?;
        }
        provider.ran();
        Ok(Some(out))
    }

    /// The loaded entry point of a provider's launch, with its declared parameters.
    fn ptx_entry(&self, l: &external::PtxLaunch) -> Result<Arc<PtxEntry>, CudaError> {
        let key = (
            crate::compile::content_hash(&[l.ptx.as_bytes()]),
            l.entry.clone(),
        );
        let mut cache = self.g.ptx_entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = cache.get(&key) {
            return Ok(e.clone());
        }
        let entry = Arc::new(PtxEntry {
            f: self.g.backend.dev.ptx_function(&l.ptx, &l.entry)?,
            params: external::entry_params(&l.ptx, &l.entry)?,
        });
        cache.insert(key, entry.clone());
        Ok(entry)
    }

    fn embedding(&self, shape: &[usize]) -> Result<Option<DevTensor>, ExecError> {
        let (table, ids) = (self.operand(0)?, self.operand(1)?);
        let &[vocab, hidden] = table.shape.as_slice() else {
            return Ok(None);
        };
        if ids.dtype != DType::I64 {
            return Ok(None);
        }
        let out = self.g.alloc(table.dtype, shape.to_vec())?;
        launch::embedding(
            &self.g.backend.dev,
            table.dtype,
            &table.buf,
            &ids.buf,
            &out.buf,
            ids.numel(),
            [vocab, hidden],
        )
        .map_err(|e| match e {
            CudaError::Args(_) => ExecError::IndexOutOfRange {
                node: self.id,
                op: self.node.op.name(),
                index: -1,
                size: vocab,
            },
            e => backend_err(e),
        })?;
        Ok(Some(out))
    }
}

fn host_of(v: &DevTensor) -> Result<Tensor, ExecError> {
    kiln_runtime::executor::DeviceValue::to_host(v)
}
