//! Binding of the CPU crate's attention kernels (paged decode attention, and
//! the encoders' packed attention): checks the arrays, borrows their memory,
//! releases the GIL for the kernel.

use mistralrs_serve_cpu::attention::{
    packed_attention as packed_kernel, paged_decode_attention as decode_kernel, AttentionShape,
    DecodeBatch, KvElem,
};
use numpy::PyUntypedArrayMethods;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::convert::{
    as_bits, readonly, readwrite, shape_of, tables_and_lens, F32_2D, F32_3D, I64_1D,
    WRITEABLE_F32_2D,
};
use crate::errors::to_py_err;

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
    let q = readonly::<f32, numpy::Ix3>("q", F32_3D, &q)?;
    let (tables, ctxs) = tables_and_lens(&block_tables, &context_lens)?;
    let mut out_rw = readwrite::<f32, numpy::Ix3>("out", F32_3D, &out)?;
    let cache_shape = shape_of("k_cache", "a 4-D array", 4, &k_cache)?;
    let q_shape = q.shape().to_vec();
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
        window: None,
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

fn run<T: KvElem>(
    py: Python<'_>,
    shape: AttentionShape,
    batch: &DecodeBatch<'_>,
    k: &[T],
    v: &[T],
    out: &mut [f32],
) -> PyResult<()> {
    py.detach(|| decode_kernel(shape, batch, k, v, out))
        .map_err(to_py_err)
}

/// Bidirectional attention of packed sequences (encoders): qkv (rows, 3 * heads *
/// head_dim) float32 with each row's q, k, v side by side; starts (num_seqs + 1,)
/// int64, sequence s being rows starts[s]..starts[s + 1]; out (rows, heads *
/// head_dim) float32, written.
#[pyfunction]
pub fn packed_attention<'py>(
    py: Python<'py>,
    qkv: Bound<'py, PyAny>,
    starts: Bound<'py, PyAny>,
    num_heads: usize,
    scale: f32,
    out: Bound<'py, PyAny>,
) -> PyResult<()> {
    let qkv = readonly::<f32, numpy::Ix2>("qkv", F32_2D, &qkv)?;
    let starts = readonly::<i64, numpy::Ix1>("starts", I64_1D, &starts)?;
    let mut out_rw = readwrite::<f32, numpy::Ix2>("out", WRITEABLE_F32_2D, &out)?;
    let cols = qkv.shape()[1];
    if num_heads == 0 || cols % (3 * num_heads) != 0 {
        return Err(PyValueError::new_err(format!(
            "qkv has {cols} columns: not 3 x num_heads ({num_heads}) x head_dim"
        )));
    }
    let starts: Vec<usize> = starts
        .as_slice()?
        .iter()
        .map(|&s| usize::try_from(s))
        .collect::<Result<_, _>>()
        .map_err(|_| PyValueError::new_err("starts must not be negative"))?;
    let head_dim = cols / 3 / num_heads;
    let qkv = qkv.as_slice()?;
    let out = out_rw.as_slice_mut()?;
    py.detach(|| packed_kernel(qkv, &starts, num_heads, head_dim, scale, out))
        .map_err(to_py_err)
}
