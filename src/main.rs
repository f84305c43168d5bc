//! The `cumulus-etl` command.

fn main() {
    let code = cumulus_etl::cli::main_with_args(std::env::args().collect());
    std::process::exit(code);
}
