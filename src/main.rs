fn main() -> std::process::ExitCode {
    credbroker::cli::main()
}
