//! One module per subcommand; each holds its clap `Args` and a `run` returning the exit status.
pub mod load;
pub mod watch;
