//! The `kiln` command line: inspect and run kiln IR graphs.
//!
//! Exit codes: 0 success, 2 bad usage or bad input (message on stderr), 1 internal error.

mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    default_sigpipe();
    let args = cli::Cli::parse();
    match cli::dispatch(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiln: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Restores the default action of SIGPIPE, which the Rust runtime ignores: output piped into a
/// reader that stops early (`kiln inspect ... | head`) then ends the process quietly, as it
/// does for other command-line tools, instead of `println!` panicking on the broken pipe.
fn default_sigpipe() {
    #[cfg(unix)]
    // SAFETY: `signal` with a valid signal number and `SIG_DFL` only changes this process's
    // disposition of SIGPIPE; it runs first in `main`, before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
