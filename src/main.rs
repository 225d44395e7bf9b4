//! The `driftwood` binary: parse the command line, run one command, map errors to exit codes
//! (0 ok, 1 the actor failed, 2 usage / I/O / model error).

use std::process::ExitCode;

use clap::Parser;

mod cli;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    if let Err(e) = driftwood::options::check() {
        eprintln!("driftwood: {e}");
        return ExitCode::from(2);
    }
    match args.command.execute() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            if cli::is_broken_pipe(&err) {
                return ExitCode::SUCCESS;
            }
            eprintln!("driftwood: {err:#}");
            ExitCode::from(cli::exit_code(&err))
        }
    }
}
