fn main() -> std::process::ExitCode {
    cryptvol::cli::main()
}
