//! PyO3 binding of mistralrs-serve-core and mistralrs-serve-cpu: converts,
//! validates, releases the GIL around the work. No logic lives here; numpy
//! conversions are in `convert`, the error mapping in `errors`.

use pyo3::prelude::*;

mod attention;
mod convert;
mod decoder;
mod errors;
mod grammar;
mod sampler;
mod scheduler;
mod stop;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<sampler::PySamplingParams>()?;
    m.add_function(wrap_pyfunction!(sampler::sample, m)?)?;
    m.add_class::<stop::PyStopMatcher>()?;
    m.add_class::<scheduler::PyScheduler>()?;
    m.add_class::<scheduler::PyStepPlan>()?;
    m.add_function(wrap_pyfunction!(attention::paged_decode_attention, m)?)?;
    m.add_function(wrap_pyfunction!(attention::packed_attention, m)?)?;
    m.add_class::<decoder::PyQuantMatrix>()?;
    m.add_class::<decoder::PyNativeDecoder>()?;
    m.add_class::<grammar::PyGrammarVocabulary>()?;
    m.add_class::<grammar::PyGrammarMatcher>()?;
    m.add_function(wrap_pyfunction!(grammar::fill_token_bitmasks, m)?)?;
    m.add_function(wrap_pyfunction!(grammar::apply_token_bitmask, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
