//! The binding's numpy conversions, in one place: arrays in (dtype, rank and
//! layout checked; a wrong argument is named in a `TypeError` or `ValueError`)
//! and arrays out.

use numpy::ndarray::{Array2, Dimension};
use numpy::{
    Element, IntoPyArray, PyArray, PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray,
    PyReadonlyArray1, PyReadonlyArray2, PyReadwriteArray, PyReadwriteArray2, PyUntypedArray,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

pub(crate) const F32_2D: &str = "a C-contiguous 2-D float32 array";
pub(crate) const F32_3D: &str = "a C-contiguous 3-D float32 array";
pub(crate) const I64_1D: &str = "a C-contiguous 1-D int64 array";
pub(crate) const I64_2D: &str = "a C-contiguous 2-D int64 array";
pub(crate) const WRITEABLE_F32_2D: &str = "a writeable, C-contiguous 2-D float32 array";

/// `dtype` and shape of an ndarray, or the type name of anything else.
fn describe(obj: &Bound<'_, PyAny>) -> String {
    match obj.cast::<PyUntypedArray>() {
        Ok(array) => {
            let dims: Vec<String> = array.shape().iter().map(|d| d.to_string()).collect();
            let comma = if dims.len() == 1 { "," } else { "" };
            format!(
                "a {} array of shape ({}{comma})",
                array.dtype(),
                dims.join(", ")
            )
        }
        Err(_) => format!(
            "a {}",
            obj.get_type()
                .name()
                .map_or_else(|_| "?".into(), |n| n.to_string())
        ),
    }
}

/// Not an ndarray: TypeError; an ndarray of the wrong dtype, rank or layout: ValueError.
pub(crate) fn bad_array(name: &str, want: &str, obj: &Bound<'_, PyAny>) -> PyErr {
    let msg = format!("{name} must be {want}, got {}", describe(obj));
    if obj.cast::<PyUntypedArray>().is_ok() {
        PyValueError::new_err(msg)
    } else {
        PyTypeError::new_err(msg)
    }
}

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

/// The logits as a writeable, row-major array: a Fortran-ordered array is
/// contiguous too, but its flat data is not rows.
pub(crate) fn logits_array<'py>(obj: &Bound<'py, PyAny>) -> PyResult<PyReadwriteArray2<'py, f32>> {
    let array = obj
        .cast::<PyArray2<f32>>()
        .map_err(|_| bad_array("logits", WRITEABLE_F32_2D, obj))?;
    if !array.is_c_contiguous() {
        return Err(PyValueError::new_err(format!(
            "logits must be C-contiguous (row-major); copy it with numpy.ascontiguousarray, got {}",
            describe(obj)
        )));
    }
    array.try_readwrite().map_err(|err| {
        PyValueError::new_err(format!("logits must be writeable and not in use: {err}"))
    })
}

/// Each of `objs` as a contiguous 1-D uint32 array, named `name[i]` in errors.
pub(crate) fn token_arrays<'py>(
    name: &str,
    objs: &[Bound<'py, PyAny>],
) -> PyResult<Vec<PyReadonlyArray1<'py, u32>>> {
    const WANT: &str = "a contiguous 1-D uint32 array";
    objs.iter()
        .enumerate()
        .map(|(i, obj)| readonly(&format!("{name}[{i}]"), WANT, obj))
        .collect()
}

/// The flat data of a 1-D array pyo3 already extracted by type.
pub(crate) fn contiguous<'a, T: Element>(
    name: &str,
    array: &'a PyReadonlyArray1<'_, T>,
) -> PyResult<&'a [T]> {
    array
        .as_slice()
        .map_err(|_| PyValueError::new_err(format!("{name} must be contiguous")))
}

/// The shape of an ndarray of any dtype whose rank is `ndim`.
pub(crate) fn shape_of(
    name: &str,
    want: &str,
    ndim: usize,
    obj: &Bound<'_, PyAny>,
) -> PyResult<Vec<usize>> {
    let array = obj
        .cast::<PyUntypedArray>()
        .map_err(|_| bad_array(name, want, obj))?;
    if array.ndim() != ndim {
        return Err(bad_array(name, want, obj));
    }
    Ok(array.shape().to_vec())
}

/// A batch's `block_tables` (rows, max_blocks) and `context_lens` (rows,), int64.
pub(crate) fn tables_and_lens<'py>(
    block_tables: &Bound<'py, PyAny>,
    context_lens: &Bound<'py, PyAny>,
) -> PyResult<(PyReadonlyArray2<'py, i64>, PyReadonlyArray1<'py, i64>)> {
    Ok((
        readonly("block_tables", I64_2D, block_tables)?,
        readonly("context_lens", I64_1D, context_lens)?,
    ))
}

/// Row indices as `usize`; `what` names one in the error for a negative one.
pub(crate) fn indices(what: &str, values: &[i64]) -> PyResult<Vec<usize>> {
    values
        .iter()
        .map(|&r| {
            usize::try_from(r).map_err(|_| PyValueError::new_err(format!("{what} {r} is negative")))
        })
        .collect()
}

/// bf16 values stored as int16 bits, seen as the u16 the kernels read.
pub(crate) fn as_bits(values: &[i16]) -> &[u16] {
    // SAFETY: i16 and u16 have the same size and alignment, every bit pattern is valid.
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u16>(), values.len()) }
}

/// bf16 values stored as int16 bits, written as the u16 the kernels write.
pub(crate) fn as_bits_mut(values: &mut [i16]) -> &mut [u16] {
    // SAFETY: i16 and u16 have the same size and alignment, every bit pattern is valid.
    unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<u16>(), values.len()) }
}

/// `values` (row-major, `rows * cols` of them by construction) as a 2-D array.
pub(crate) fn matrix<T: Element>(
    py: Python<'_>,
    rows: usize,
    cols: usize,
    values: Vec<T>,
) -> Bound<'_, PyArray2<T>> {
    Array2::from_shape_vec((rows, cols), values)
        .expect("rows * cols values by construction")
        .into_pyarray(py)
}

/// Counts and ids as numpy's int64.
pub(crate) fn widen<T: Copy + Into<i64>>(py: Python<'_>, values: &[T]) -> Py<PyArray1<i64>> {
    let wide: Vec<i64> = values.iter().map(|&x| x.into()).collect();
    wide.into_pyarray(py).unbind()
}

/// Sequence ids as numpy's int64 (the engine numbers them from 0, far below 2^63).
pub(crate) fn seq_id_array(py: Python<'_>, ids: &[u64]) -> Py<PyArray1<i64>> {
    let ids: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
    ids.into_pyarray(py).unbind()
}
