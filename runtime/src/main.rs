//! `husk`: the command line. Each subcommand lives in its own module of the library.

use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use husk_runtime::{bench, boot, vm};

#[derive(Parser, Debug)]
#[command(name = "husk", version, about = "Containers in KVM micro-VMs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot the default guest to a ready agent, report the time, and power it off.
    Boot(boot::BootArgs),
    /// Run the bare VMM until the guest powers off.
    Vm(vm::VmArgs),
    /// Benchmarks against a reference measured in the same run.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
}

fn main() -> ExitCode {
    let started = Instant::now();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Boot(args) => boot::run(&args, started),
        Command::Vm(args) => vm::run(args),
        Command::Bench(cmd) => bench::run(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the chain of causes joined, outermost first.
            eprintln!("husk: {e:#}");
            ExitCode::FAILURE
        }
    }
}
