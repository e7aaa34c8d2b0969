// Each exchange allocates and frees many small objects (claims maps, JSON, rows) across the
// runtime's threads; under glibc malloc that was about a fifth of the broker's CPU, partly spent
// waiting on arena locks (bench/README.md, "bench/issuance"). The client build keeps the system allocator.
#[cfg(feature = "server")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    credbroker::cli::main()
}
