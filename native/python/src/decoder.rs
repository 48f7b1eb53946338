//! Binding of the CPU crate's fused model step: quantized matrices built from
//! numpy arrays, and one `forward` per step with the GIL released.

use mistralrs_serve_cpu::decoder::{
    Activation, Decoder, DecoderShape, KvCache, KvStore, LayerWeights, StepRows,
};
use std::sync::Arc;

use mistralrs_serve_cpu::quant::{GgufType, QMatrix};
use numpy::{PyArray2, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::convert::{
    as_bits_mut, bad_array, indices, matrix, readonly, readwrite, shape_of, tables_and_lens,
    F32_2D, I64_1D, WRITEABLE_F32_2D,
};
use crate::errors::to_py_err;

/// A weight matrix in blocks of 32 columns, repacked for the integer kernels
/// (shared with any decoder built from it).
#[pyclass(frozen, name = "QuantMatrix", module = "mistralrs_serve._native")]
pub struct PyQuantMatrix {
    inner: Arc<QMatrix>,
}

#[pymethods]
impl PyQuantMatrix {
    /// 4-bit codes q (rows, cols) uint8 in 0..16, scale and offset (rows, cols / 32) float32.
    #[staticmethod]
    fn from_q4(
        q: Bound<'_, PyAny>,
        scale: Bound<'_, PyAny>,
        offset: Bound<'_, PyAny>,
    ) -> PyResult<Self> {
        let q = readonly::<u8, numpy::Ix2>("q", "a C-contiguous 2-D uint8 array", &q)?;
        let scale = readonly::<f32, numpy::Ix2>("scale", F32_2D, &scale)?;
        let offset = readonly::<f32, numpy::Ix2>("offset", F32_2D, &offset)?;
        let (rows, cols) = (q.shape()[0], q.shape()[1]);
        let m = QMatrix::from_q4(
            q.as_slice()?,
            scale.as_slice()?,
            offset.as_slice()?,
            rows,
            cols,
        )
        .map_err(to_py_err)?;
        Ok(Self { inner: Arc::new(m) })
    }

    /// Float weights (rows, cols) float32, quantized to 8 bits per block of 32.
    #[staticmethod]
    fn quantize_q8(w: Bound<'_, PyAny>) -> PyResult<Self> {
        let w = readonly::<f32, numpy::Ix2>("w", F32_2D, &w)?;
        let (rows, cols) = (w.shape()[0], w.shape()[1]);
        let m = QMatrix::quantize_q8(w.as_slice()?, rows, cols).map_err(to_py_err)?;
        Ok(Self { inner: Arc::new(m) })
    }

    /// A (rows, cols) tensor of GGUF type `type_name` (Q4_0, Q4_1, Q5_0, Q5_1,
    /// Q8_0, Q4_K, Q5_K, Q6_K) from its bytes as the file stores them (a
    /// C-contiguous uint8 array of any shape, e.g. a view of the mapped file).
    #[staticmethod]
    fn from_gguf(
        py: Python<'_>,
        type_name: &str,
        data: Bound<'_, PyAny>,
        rows: usize,
        cols: usize,
    ) -> PyResult<Self> {
        let Some(t) = GgufType::from_name(type_name) else {
            return Err(PyValueError::new_err(format!(
                "GGML type {type_name} has no fused CPU kernel (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K do)"
            )));
        };
        let data = readonly::<u8, numpy::IxDyn>("data", "a C-contiguous uint8 array", &data)?;
        let bytes = data.as_slice()?;
        let m = py
            .detach(|| QMatrix::from_gguf(t, bytes, rows, cols))
            .map_err(to_py_err)?;
        Ok(Self { inner: Arc::new(m) })
    }

    /// Matrices of equal width stacked by rows, each part keeping its kind.
    #[staticmethod]
    fn concat(parts: Vec<PyRef<'_, PyQuantMatrix>>) -> PyResult<Self> {
        let all = parts.iter().map(|p| (*p.inner).clone()).collect();
        let m = QMatrix::concat(all).map_err(to_py_err)?;
        Ok(Self { inner: Arc::new(m) })
    }

    /// Rows `ids` (int64) dequantized: (len(ids), cols) float32 (embedding lookups).
    fn dequantize_rows<'py>(
        &self,
        py: Python<'py>,
        ids: Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let ids = readonly::<i64, numpy::Ix1>("ids", I64_1D, &ids)?;
        let m = &self.inner;
        let rows = indices("ids", ids.as_slice()?)?;
        if let Some(bad) = rows.iter().find(|&&r| r >= m.rows) {
            return Err(PyValueError::new_err(format!(
                "row {bad} of a {}-row matrix",
                m.rows
            )));
        }
        let values = py.detach(|| rows.iter().flat_map(|&r| m.dequantize_row(r)).collect());
        Ok(matrix(py, rows.len(), m.cols, values))
    }

    /// Bytes one pass over the matrix reads (codes, scales, offsets).
    #[getter]
    fn nbytes(&self) -> usize {
        self.inner.nbytes()
    }

    /// Whether this CPU runs a vector kernel (AVX-512 VNNI, AVX2 or NEON, as
    /// `MISTRALRS_SERVE_CPU_PATH` allows); without one the portable loops are
    /// correct but far slower than torch.
    #[staticmethod]
    fn has_fast_kernel() -> bool {
        mistralrs_serve_cpu::quant::kernel_path()
            != mistralrs_serve_cpu::quant::KernelPath::Portable
    }

    /// The instruction set of the integer products: "avx512", "avx2",
    /// "neon-dotprod", "neon" or "portable".
    #[staticmethod]
    fn kernel_path() -> &'static str {
        mistralrs_serve_cpu::quant::kernel_path().name()
    }

    /// Every path this CPU runs, fastest first (what MISTRALRS_SERVE_CPU_PATH may name).
    #[staticmethod]
    fn supported_paths() -> Vec<&'static str> {
        use mistralrs_serve_cpu::quant::KernelPath;
        KernelPath::ALL
            .into_iter()
            .filter(|p| p.supported())
            .map(KernelPath::name)
            .collect()
    }

    #[getter]
    fn shape(&self) -> (usize, usize) {
        (self.inner.rows, self.inner.cols)
    }
}

type LayerArgs<'py> = (
    Vec<f32>,
    PyRef<'py, PyQuantMatrix>,
    Option<Vec<f32>>,
    Option<Vec<f32>>,
    Option<Vec<f32>>,
    PyRef<'py, PyQuantMatrix>,
    Option<Vec<f32>>,
    Vec<f32>,
    PyRef<'py, PyQuantMatrix>,
    PyRef<'py, PyQuantMatrix>,
);

/// Per layer, beyond the Llama layer: (post_attn_norm, post_ffn_norm, window, rope_table).
type LayerExtras = (Option<Vec<f32>>, Option<Vec<f32>>, Option<usize>, usize);

/// The decoder's layers from the binding's tuples: the extras default to none,
/// the KV layout to one group with the layers in order.
fn layer_weights(
    layers: Vec<LayerArgs<'_>>,
    layer_extras: Option<Vec<LayerExtras>>,
    kv_layout: Option<Vec<(usize, usize)>>,
) -> PyResult<Vec<LayerWeights>> {
    let extras = layer_extras.unwrap_or_else(|| vec![(None, None, None, 0); layers.len()]);
    let kv_layout = kv_layout.unwrap_or_else(|| (0..layers.len()).map(|i| (0, i)).collect());
    if extras.len() != layers.len() || kv_layout.len() != layers.len() {
        return Err(PyValueError::new_err(format!(
            "{} layer_extras and {} kv_layout entries for {} layers",
            extras.len(),
            kv_layout.len(),
            layers.len()
        )));
    }
    let mut built = Vec::with_capacity(layers.len());
    for (
        (
            (attn_norm, qkv, qkv_bias, q_norm, k_norm, o, o_bias, ffn_norm, gate_up, down),
            (post_attn_norm, post_ffn_norm, window, rope_table),
        ),
        kv,
    ) in layers.into_iter().zip(extras).zip(kv_layout)
    {
        built.push(LayerWeights {
            attn_norm,
            qkv: Arc::clone(&qkv.inner),
            qkv_bias,
            q_norm,
            k_norm,
            o: Arc::clone(&o.inner),
            o_bias,
            ffn_norm,
            gate_up: Arc::clone(&gate_up.inner),
            down: Arc::clone(&down.inner),
            post_attn_norm,
            post_ffn_norm,
            window,
            rope_table,
            kv,
        });
    }
    Ok(built)
}

/// A Llama-family model's step (decode and prefill rows), fused (see `mistralrs_serve_cpu::decoder`).
#[pyclass(frozen, name = "NativeDecoder", module = "mistralrs_serve._native")]
pub struct PyNativeDecoder {
    inner: Decoder,
}

#[pymethods]
impl PyNativeDecoder {
    /// layers: per layer (attn_norm, qkv, qkv_bias, q_norm, k_norm, o, o_bias,
    /// ffn_norm, gate_up, down); the matrices are moved into the decoder.
    /// activation "silu" or "gelu_tanh"; attn_scale None for 1 / sqrt(head_dim);
    /// attn_softcap: the scaled scores' `cap tanh(s / cap)` (Gemma 2), None for none;
    /// layer_extras: per layer (post_attn_norm, post_ffn_norm, window, rope_table);
    /// kv_layout: per layer (KV group, place in a cache block), None: (0, its index).
    #[new]
    #[pyo3(signature = (*, hidden, num_heads, num_kv_heads, head_dim, intermediate, vocab, eps, layers, final_norm, lm_head, activation = "silu", attn_scale = None, attn_softcap = None, layer_extras = None, kv_layout = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        hidden: usize,
        num_heads: usize,
        num_kv_heads: usize,
        head_dim: usize,
        intermediate: usize,
        vocab: usize,
        eps: f32,
        layers: Vec<LayerArgs<'_>>,
        final_norm: Vec<f32>,
        lm_head: PyRef<'_, PyQuantMatrix>,
        activation: &str,
        attn_scale: Option<f32>,
        attn_softcap: Option<f32>,
        layer_extras: Option<Vec<LayerExtras>>,
        kv_layout: Option<Vec<(usize, usize)>>,
    ) -> PyResult<Self> {
        if let Some(cap) = attn_softcap.filter(|c| !(c.is_finite() && *c > 0.0)) {
            return Err(PyValueError::new_err(format!(
                "attn_softcap {cap}: a positive number"
            )));
        }
        let activation = match activation {
            "silu" => Activation::Silu,
            "gelu_tanh" => Activation::GeluTanh,
            other => {
                return Err(PyValueError::new_err(format!(
                    "activation {other:?}: silu or gelu_tanh"
                )))
            }
        };
        let shape = DecoderShape {
            hidden,
            num_heads,
            num_kv_heads,
            head_dim,
            intermediate,
            vocab,
            eps,
            activation,
            attn_scale,
            attn_softcap,
        };
        let built = layer_weights(layers, layer_extras, kv_layout)?;
        let head = Arc::clone(&lm_head.inner);
        let inner = Decoder::new(shape, built, final_norm, head).map_err(to_py_err)?;
        Ok(Self { inner })
    }

    /// Weight bytes one step reads.
    #[getter]
    fn weight_bytes(&self) -> usize {
        self.inner.weight_bytes()
    }

    /// One step, one token per row. x (rows, hidden) float32, overwritten; cos/sin (rows,
    /// head_dim / 2) float32; context_lens (rows,) int64; slots (groups * rows,) int64 and
    /// block_tables (groups * rows, max_blocks) int64, KV group after group; logit_rows
    /// (n,) int64; kv the whole cache (2, cache layers, blocks, block_size, kv_heads,
    /// head_dim), float32 or int16
    /// holding bf16 bits, written; logits (n, vocab) float32, written; cos_local/sin_local
    /// the rotary table of the layers with rope_table 1.
    #[pyo3(signature = (x, cos, sin, slots, block_tables, context_lens, logit_rows, kv, logits, threads = 1, cos_local = None, sin_local = None))]
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        py: Python<'_>,
        x: Bound<'_, PyAny>,
        cos: Bound<'_, PyAny>,
        sin: Bound<'_, PyAny>,
        slots: Bound<'_, PyAny>,
        block_tables: Bound<'_, PyAny>,
        context_lens: Bound<'_, PyAny>,
        logit_rows: Bound<'_, PyAny>,
        kv: Bound<'_, PyAny>,
        logits: Bound<'_, PyAny>,
        threads: usize,
        cos_local: Option<Bound<'_, PyAny>>,
        sin_local: Option<Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let mut x = readwrite::<f32, numpy::Ix2>("x", WRITEABLE_F32_2D, &x)?;
        let cos = readonly::<f32, numpy::Ix2>("cos", F32_2D, &cos)?;
        let sin = readonly::<f32, numpy::Ix2>("sin", F32_2D, &sin)?;
        let local = match (&cos_local, &sin_local) {
            (Some(c), Some(s)) => Some((
                readonly::<f32, numpy::Ix2>("cos_local", F32_2D, c)?,
                readonly::<f32, numpy::Ix2>("sin_local", F32_2D, s)?,
            )),
            (None, None) => None,
            _ => return Err(PyValueError::new_err("cos_local and sin_local go together")),
        };
        let slots = readonly::<i64, numpy::Ix1>("slots", I64_1D, &slots)?;
        let (tables, ctxs) = tables_and_lens(&block_tables, &context_lens)?;
        let wanted = readonly::<i64, numpy::Ix1>("logit_rows", I64_1D, &logit_rows)?;
        let wanted = indices("logit row", wanted.as_slice()?)?;
        let mut logits = readwrite::<f32, numpy::Ix2>("logits", WRITEABLE_F32_2D, &logits)?;
        const KV: &str = "a writeable, C-contiguous 6-D float32 or int16 (bf16 bits) array";
        let kv_shape = shape_of("kv", KV, 6, &kv)?;
        if kv_shape[0] != 2 || kv_shape[1] != self.inner.cache_layers() {
            return Err(bad_array("kv", KV, &kv));
        }
        let block_size = kv_shape[3];
        let max_blocks = tables.shape()[1];
        let (x, logits) = (x.as_slice_mut()?, logits.as_slice_mut()?);
        let rows = StepRows {
            x,
            cos: cos.as_slice()?,
            sin: sin.as_slice()?,
            local: match &local {
                Some((c, s)) => Some((c.as_slice()?, s.as_slice()?)),
                None => None,
            },
            slots: slots.as_slice()?,
            block_tables: tables.as_slice()?,
            max_blocks,
            context_lens: ctxs.as_slice()?,
            logit_rows: &wanted,
        };
        if let Ok(mut cache) = readwrite::<f32, numpy::IxDyn>("kv", KV, &kv) {
            run(
                py,
                &self.inner,
                rows,
                cache.as_slice_mut()?,
                block_size,
                logits,
                threads,
            )
        } else {
            let mut cache = readwrite::<i16, numpy::IxDyn>("kv", KV, &kv)?;
            let bits = as_bits_mut(cache.as_slice_mut()?);
            run(py, &self.inner, rows, bits, block_size, logits, threads)
        }
    }
}

fn run<T: KvStore>(
    py: Python<'_>,
    decoder: &Decoder,
    rows: StepRows<'_>,
    kv: &mut [T],
    block_size: usize,
    logits: &mut [f32],
    threads: usize,
) -> PyResult<()> {
    py.detach(|| decoder.forward(rows, KvCache { kv, block_size }, logits, threads))
        .map_err(to_py_err)
}
