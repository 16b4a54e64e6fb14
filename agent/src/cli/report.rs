//! `awaitlab report RESULTS_DIR`: (re)writes report.md and report.html from a results directory.
//! It reads only the results files, so it works on a folder copied from another machine.

use std::{path::PathBuf, process::ExitCode};

use crate::{fail, EXIT_USAGE};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A results directory written by `awaitlab run` (it holds index.json and cells/).
    pub results_dir: PathBuf,
}

pub fn run(args: Args) -> ExitCode {
    match crate::study::report::write(&args.results_dir) {
        Ok((md, html)) => {
            println!("{}\n{}", md.display(), html.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            let code = if matches!(e, crate::study::results::ResultsError::NotResults(_)) {
                EXIT_USAGE
            } else {
                1
            };
            fail(&anyhow::Error::new(e), code)
        }
    }
}
