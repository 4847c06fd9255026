//! The `kiln` command line: inspect and run kiln IR graphs.
//!
//! Exit codes: 0 success, 2 bad usage or bad input (message on stderr), 1 internal error.

mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::dispatch(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiln: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
