//! One module per subcommand; each holds its clap `Args` and a `run` returning the exit status.
pub mod sut;
pub mod watch;
