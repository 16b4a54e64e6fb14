//! One module per subcommand; each holds its clap `Args` and a `run` returning the exit status.
pub mod daemon;
pub mod delay;
pub mod load;
pub mod report;
pub mod run;
pub mod sut;
pub mod watch;
