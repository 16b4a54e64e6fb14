//! The study: the system under test (`sut`), the experiment runner and its configuration
//! (`experiment`), the results on disk (`results`) and the report (`report`). It uses the
//! probes, the delay injector and the load generator; they know nothing of it.

pub mod experiment;
pub mod report;
pub mod results;
pub mod sut;
