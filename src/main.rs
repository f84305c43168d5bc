//! The `cumulus-etl` command.

fn main() {
    cumulus_etl::panic_guard::install_hook();
    cumulus_etl::memory::budget::tune_allocator();
    let code = cumulus_etl::cli::main_with_args(std::env::args().collect());
    std::process::exit(code);
}
