//! The `awaitlab` binary: everything lives in the library (`awaitlab::run`), so that tests and
//! other front ends drive the same code.
fn main() -> std::process::ExitCode {
    awaitlab::run(std::env::args_os())
}
