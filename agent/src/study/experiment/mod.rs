//! The experiment runner: the study's matrix (setup x route x added delay x repetition), one
//! cell at a time, results written as each cell ends.
pub mod config;
pub mod run;
