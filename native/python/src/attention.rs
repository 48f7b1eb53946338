//! Binding of the CPU crate's paged decode attention: checks the arrays,
//! borrows their memory, releases the GIL for the kernel.

use mistralrs_serve_cpu::attention::{
    paged_decode_attention as decode_kernel, AttentionShape, DecodeBatch, KvElem,
};
use numpy::ndarray::Dimension;
use numpy::{
    Element, PyArray, PyArrayMethods, PyReadonlyArray, PyReadwriteArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::bad_array;

/// `obj` as a C-contiguous array of `T` with rank `D`, or the error naming it.
fn c_array<'a, 'py, T: Element, D: Dimension>(
    name: &str,
    want: &str,
    obj: &'a Bound<'py, PyAny>,
) -> PyResult<&'a Bound<'py, PyArray<T, D>>> {
    let array = obj
        .cast::<PyArray<T, D>>()
        .map_err(|_| bad_array(name, want, obj))?;
    if !array.is_c_contiguous() {
        return Err(bad_array(name, want, obj));
    }
    Ok(array)
}

/// A read-only view of a C-contiguous array of `T` with rank `D`.
pub(crate) fn readonly<'py, T: Element, D: Dimension>(
    name: &str,
    want: &str,
    obj: &Bound<'py, PyAny>,
) -> PyResult<PyReadonlyArray<'py, T, D>> {
    c_array(name, want, obj)?
        .try_readonly()
        .map_err(|err| PyValueError::new_err(format!("{name} is not readable: {err}")))
}

/// A writeable view of a C-contiguous array of `T` with rank `D`.
pub(crate) fn readwrite<'py, T: Element, D: Dimension>(
    name: &str,
    want: &str,
    obj: &Bound<'py, PyAny>,
) -> PyResult<PyReadwriteArray<'py, T, D>> {
    c_array(name, want, obj)?
        .try_readwrite()
        .map_err(|err| PyValueError::new_err(format!("{name} is not writeable: {err}")))
}

/// Decode attention of one query row per sequence over the paged cache.
///
/// q (num_seqs, num_heads, head_dim) float32; k_cache / v_cache one layer's
/// (num_blocks, block_size, num_kv_heads, head_dim), float32 or int16
/// holding bf16 bits; block_tables (num_seqs, max_blocks) int64;
/// context_lens (num_seqs,) int64; out like q, written.
#[pyfunction]
#[allow(clippy::too_many_arguments)] // the kernel's arrays, as numpy hands them over
pub fn paged_decode_attention<'py>(
    py: Python<'py>,
    q: Bound<'py, PyAny>,
    k_cache: Bound<'py, PyAny>,
    v_cache: Bound<'py, PyAny>,
    block_tables: Bound<'py, PyAny>,
    context_lens: Bound<'py, PyAny>,
    scale: f32,
    out: Bound<'py, PyAny>,
) -> PyResult<()> {
    const F3: &str = "a C-contiguous 3-D float32 array";
    let q = readonly::<f32, numpy::Ix3>("q", F3, &q)?;
    let tables = readonly::<i64, numpy::Ix2>(
        "block_tables",
        "a C-contiguous 2-D int64 array",
        &block_tables,
    )?;
    let ctxs = readonly::<i64, numpy::Ix1>(
        "context_lens",
        "a contiguous 1-D int64 array",
        &context_lens,
    )?;
    let mut out_rw = readwrite::<f32, numpy::Ix3>("out", F3, &out)?;
    let (q_shape, cache_shape) = (q.shape().to_vec(), cache_shape(&k_cache)?);
    if cache_shape[3] != q_shape[2] {
        return Err(PyValueError::new_err(format!(
            "head_dim differs: q has {}, the cache {}",
            q_shape[2], cache_shape[3]
        )));
    }
    let shape = AttentionShape {
        num_heads: q_shape[1],
        num_kv_heads: cache_shape[2],
        head_dim: q_shape[2],
        block_size: cache_shape[1],
    };
    let batch = DecodeBatch {
        q: q.as_slice()?,
        block_tables: tables.as_slice()?,
        max_blocks: tables.shape()[1],
        context_lens: ctxs.as_slice()?,
        scale,
    };
    let out_slice = out_rw.as_slice_mut()?;
    const CACHE: &str = "a C-contiguous 4-D float32 or int16 (bf16 bits) array";
    if let Ok(k) = readonly::<f32, numpy::Ix4>("k_cache", CACHE, &k_cache) {
        let v = readonly::<f32, numpy::Ix4>("v_cache", "of k_cache's dtype and shape", &v_cache)?;
        run(py, shape, &batch, k.as_slice()?, v.as_slice()?, out_slice)
    } else {
        let k = readonly::<i16, numpy::Ix4>("k_cache", CACHE, &k_cache)?;
        let v = readonly::<i16, numpy::Ix4>("v_cache", "of k_cache's dtype and shape", &v_cache)?;
        run(
            py,
            shape,
            &batch,
            as_bits(k.as_slice()?),
            as_bits(v.as_slice()?),
            out_slice,
        )
    }
}

fn cache_shape(k_cache: &Bound<'_, PyAny>) -> PyResult<Vec<usize>> {
    let array = k_cache
        .cast::<numpy::PyUntypedArray>()
        .map_err(|_| bad_array("k_cache", "a 4-D array", k_cache))?;
    if array.ndim() != 4 {
        return Err(bad_array("k_cache", "a 4-D array", k_cache));
    }
    Ok(array.shape().to_vec())
}

/// bf16 values stored as int16 bits, seen as the u16 the kernel reads.
fn as_bits(values: &[i16]) -> &[u16] {
    // SAFETY: i16 and u16 have the same size and alignment, every bit pattern is valid.
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u16>(), values.len()) }
}

fn run<T: KvElem>(
    py: Python<'_>,
    shape: AttentionShape,
    batch: &DecodeBatch<'_>,
    k: &[T],
    v: &[T],
    out: &mut [f32],
) -> PyResult<()> {
    py.detach(|| decode_kernel(shape, batch, k, v, out))
        .map_err(|err| PyValueError::new_err(err.to_string()))
}
