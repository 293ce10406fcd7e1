//! `husk`: the command line, runc-compatible where runc has the command (see `cli`).

fn main() -> std::process::ExitCode {
    husk_runtime::cli::main()
}
