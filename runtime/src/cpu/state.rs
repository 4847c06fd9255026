//! Values the CPU backend keeps between runs of a graph: a causal LM's KV cache. A graph
//! output computed by `concat` (the cache so far, then the new keys) is stored with spare
//! capacity along the concat axis and returned as a [`CpuState`]; fed back as the next run's
//! input, its `concat` writes only the new rows into that capacity instead of copying the
//! whole cache, so a decode step costs O(new tokens), not O(context). The capacity doubles
//! when it runs out (amortized O(1) per token).
//!
//! A bf16 state (a bf16 model's KV cache) is stored as bf16, half the bytes of the widened
//! f32 the backend's other buffers hold: decode attention reads the whole cache every token,
//! so its bytes are time. Its elements are packed two to an f32 slot of the buffer
//! ([`narrow`], [`narrow_mut`] view them), so it moves through the executor's buffers as any
//! other.

use super::layout::{Dims, Layout, MAX_RANK};
use crate::executor::DeviceValue;
use crate::reference::ExecError;
use crate::{Storage, Tensor};
use half::bf16;
use kiln_ir::DType;
use kiln_kernels::layout::copy_strided_convert;
use std::any::Any;
use std::sync::Arc;

/// A state taken from a device value, and the value's handle, emptied, where it was the only
/// holder ([`CpuState::take`]).
pub type Taken = (CpuState, Option<Arc<CpuState>>);

/// A value stored with room to grow along one axis: `data` holds a dense buffer of
/// [`CpuState::capacity`] positions along `axis`, of which the first `layout.shape[axis]`
/// are filled. Elements of a bf16 state are stored as bf16, packed two to an f32 slot
/// ([`stored_narrow`]); others widened to f32, exactly representable in `dtype`. The layout
/// counts elements either way.
#[derive(Debug, Clone)]
pub struct CpuState {
    dtype: DType,
    axis: usize,
    layout: Layout,
    data: Vec<f32>,
}

/// Whether a state of `dtype` stores its elements as bf16 (else as f32).
pub fn stored_narrow(dtype: DType) -> bool {
    dtype == DType::BF16
}

/// The bf16 elements a narrow state's buffer holds.
pub fn narrow(data: &[f32]) -> &[bf16] {
    bytemuck::cast_slice(data)
}

/// The bf16 elements a narrow state's buffer holds, writable.
pub fn narrow_mut(data: &mut [f32]) -> &mut [bf16] {
    bytemuck::cast_slice_mut(data)
}

/// Positions to allocate for `needed`: twice that, at least 64.
pub fn grown_capacity(needed: usize) -> usize {
    needed.saturating_mul(2).max(64)
}

impl CpuState {
    /// A zeroed state of `shape` whose axis `axis` can grow to `capacity` positions in place,
    /// or to as many as fit in the memory available (at least `shape`'s own). Refused with
    /// [`ExecError::OutOfMemory`] before allocating when even `shape` does not fit, and with
    /// a shape error when `axis` is not an axis of `shape`, the size overflows or `shape` has
    /// more than `MAX_RANK` (8) axes.
    pub fn zeroed(
        dtype: DType,
        shape: &[usize],
        axis: usize,
        capacity: usize,
    ) -> Result<Self, ExecError> {
        let len = *shape
            .get(axis)
            .ok_or_else(|| backend_err(format!("a state of shape {shape:?} has no axis {axis}")))?;
        let dims = Dims::try_from_slice(shape).ok_or_else(|| {
            backend_err(format!(
                "a state of shape {shape:?} has more than {MAX_RANK} axes"
            ))
        })?;
        let numel = |positions: usize| {
            let mut full = dims;
            full[axis] = positions;
            full.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
        };
        let size = if stored_narrow(dtype) { 2 } else { 4 };
        let needed = numel(len)
            .and_then(|n| n.checked_mul(size))
            .ok_or_else(|| backend_err(format!("a state of shape {shape:?} overflows")))?;
        let available = super::exec::available_memory();
        let fits = |positions: usize| {
            numel(positions)
                .and_then(|n| n.checked_mul(size))
                .is_some_and(|bytes| available.is_none_or(|a| bytes <= a))
        };
        if !fits(len) {
            return Err(ExecError::OutOfMemory {
                needed,
                available: available.unwrap_or(0),
                detail: format!("a KV cache of shape {shape:?}"),
            });
        }
        let positions = if fits(capacity.max(len)) {
            capacity.max(len)
        } else {
            len
        };
        let elems = numel(positions).unwrap_or(0);
        // f32 slots: two bf16 elements each when narrow.
        let n = elems.div_ceil(4 / size);
        let mut data = Vec::new();
        data.try_reserve_exact(n)
            .map_err(|_| ExecError::OutOfMemory {
                needed: elems.saturating_mul(size),
                available: available.unwrap_or(0),
                detail: format!(
                    "a KV cache of shape {shape:?} with room for {positions} positions"
                ),
            })?;
        data.resize(n, 0.0);
        let mut full = dims;
        full[axis] = positions;
        Ok(CpuState {
            dtype,
            axis,
            layout: Layout {
                shape: dims,
                strides: Layout::dense(&full).strides,
                offset: 0,
            },
            data,
        })
    }

    /// The axis it grows along.
    pub fn axis(&self) -> usize {
        self.axis
    }

    /// Positions along the axis the buffer holds.
    pub fn capacity(&self) -> usize {
        let inner = self.layout.strides[self.axis];
        let outer = match self.axis {
            0 if self.is_narrow() => self.data.len() * 2,
            0 => self.data.len(),
            a => self.layout.strides[a - 1],
        };
        outer.checked_div(inner).unwrap_or(0)
    }

    /// Whether the elements are stored as bf16 ([`stored_narrow`]).
    pub fn is_narrow(&self) -> bool {
        stored_narrow(self.dtype)
    }

    /// The filled part's layout in the buffer.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The buffer and the filled part's layout, taken apart (to run a graph on it).
    pub fn into_parts(self) -> (Vec<f32>, Layout) {
        (self.data, self.layout)
    }

    /// A state from a buffer and layout [`into_parts`](Self::into_parts) gave (grown along the
    /// axis since).
    pub fn from_parts(data: Vec<f32>, layout: Layout, dtype: DType, axis: usize) -> Self {
        CpuState {
            dtype,
            axis,
            layout,
            data,
        }
    }

    /// The value of `value` if it is a CPU state: taken when this is its only holder (with the
    /// handle, emptied, to hold another state without allocating one), copied otherwise;
    /// `Err` gives the value back when it is not.
    pub fn take(value: Arc<dyn DeviceValue>) -> Result<Taken, Arc<dyn DeviceValue>> {
        if value.as_any().downcast_ref::<CpuState>().is_none() {
            return Err(value);
        }
        match value.into_any().downcast::<CpuState>() {
            Ok(mut handle) => match Arc::get_mut(&mut handle) {
                Some(state) => {
                    let empty =
                        CpuState::from_parts(Vec::new(), Layout::dense(&[0]), state.dtype, 0);
                    Ok((std::mem::replace(state, empty), Some(handle)))
                }
                None => Ok(((*handle).clone(), None)),
            },
            Err(_) => unreachable!("checked to be a CpuState above"),
        }
    }
}

impl DeviceValue for CpuState {
    fn dtype(&self) -> DType {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.layout.shape
    }

    fn to_host(&self) -> Result<Tensor, ExecError> {
        let l = &self.layout;
        let dense = Layout::dense(&l.shape);
        if self.is_narrow() {
            let mut out = vec![bf16::ZERO; l.numel()];
            let src = narrow(&self.data);
            copy_strided_convert(
                &l.shape,
                src,
                l.offset,
                &l.strides,
                &mut out,
                0,
                &dense.strides,
            )
            .map_err(backend_err)?;
            return Tensor::new(l.shape.to_vec(), Storage::BF16(out)).map_err(backend_err);
        }
        let mut out = vec![0.0; l.numel()];
        copy_strided_convert(
            &l.shape,
            &self.data,
            l.offset,
            &l.strides,
            &mut out,
            0,
            &dense.strides,
        )
        .map_err(backend_err)?;
        let t = Tensor::from_f32(l.shape.to_vec(), out).map_err(backend_err)?;
        Ok(if self.dtype == DType::F32 {
            t
        } else {
            t.cast(self.dtype)
        })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }
}

fn backend_err(e: impl std::fmt::Display) -> ExecError {
    ExecError::Backend {
        backend: "cpu",
        detail: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_has_room_along_its_axis_and_copies_out_only_the_filled_part() {
        let mut s = CpuState::zeroed(DType::F16, &[1, 2, 3, 4], 2, 5).unwrap();
        assert_eq!((s.axis(), s.capacity()), (2, 5));
        assert_eq!(*s.layout().strides, [40, 20, 4, 1]);
        for (i, x) in s.data.iter_mut().enumerate() {
            *x = i as f32;
        }
        let t = s.to_host().unwrap();
        assert_eq!((t.dtype(), t.shape()), (DType::F16, &[1, 2, 3, 4][..]));
        let t = t.cast(DType::F32);
        let v = t.as_f32().unwrap();
        // Head 1 starts after head 0's five positions, not its three filled ones.
        assert_eq!((v[0], v[11], v[12], v[23]), (0.0, 11.0, 20.0, 31.0));
        let arc: Arc<dyn DeviceValue> = Arc::new(s);
        let shared = arc.clone();
        // Shared: copied, and no handle to reuse; then the last holder's, taken with its handle.
        let (copy, handle) = CpuState::take(arc).ok().unwrap();
        assert_eq!((copy.capacity(), handle.is_none()), (5, true));
        let (taken, handle) = CpuState::take(shared).ok().unwrap();
        assert_eq!(taken.capacity(), 5);
        assert_eq!(handle.map(|h| h.data.capacity()), Some(0));
        assert!(CpuState::zeroed(DType::F32, &[2, 3], 2, 5).is_err());
        assert!(CpuState::zeroed(DType::F32, &[usize::MAX, 3], 1, 5).is_err());
        // A bf16 state: two elements per f32 slot, the same positions and layout.
        let mut s = CpuState::zeroed(DType::BF16, &[1, 2, 3, 4], 2, 5).unwrap();
        assert_eq!((s.capacity(), s.data.len()), (5, 20));
        for (i, x) in narrow_mut(&mut s.data).iter_mut().enumerate() {
            *x = bf16::from_f32(i as f32);
        }
        let t = s.to_host().unwrap();
        assert_eq!((t.dtype(), t.shape()), (DType::BF16, &[1, 2, 3, 4][..]));
        let v = t.cast(DType::F32);
        let v = v.as_f32().unwrap();
        assert_eq!((v[0], v[11], v[12], v[23]), (0.0, 11.0, 20.0, 31.0));
        // An odd element count still fits (the last slot half used); axis 0 grows.
        let s = CpuState::zeroed(DType::BF16, &[3, 1], 0, 7).unwrap();
        assert_eq!((s.capacity(), s.data.len()), (8, 4));
        // More than this machine has: refused before allocating, with the bytes it needs.
        let huge = CpuState::zeroed(DType::F32, &[1 << 20, 1 << 20, 1, 64], 2, 64).unwrap_err();
        assert!(
            matches!(huge, ExecError::OutOfMemory { needed, .. } if needed == 1 << 48),
            "{huge}"
        );
    }
}
