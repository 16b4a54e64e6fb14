//! One module per subcommand; each holds its clap `Args` and a `run` returning the exit status.
pub mod daemon;
pub mod report;
pub mod run;
pub mod delay;
pub mod load;
pub mod sut;
pub mod watch;
