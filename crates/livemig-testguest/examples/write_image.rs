//! Writes the test guest's ELF image to a file: `cargo run --example write_image -- guest.elf`.

use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(path) = std::env::args_os().nth(1) else {
        eprintln!("usage: write_image <output.elf>");
        return ExitCode::from(2);
    };
    let image = match livemig_testguest::image() {
        Ok(i) => i,
        Err(e) => {
            eprintln!("building the image: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = std::fs::write(&path, &image) {
        eprintln!("writing {}: {e}", path.to_string_lossy());
        return ExitCode::FAILURE;
    }
    println!("wrote {} bytes to {}", image.len(), path.to_string_lossy());
    ExitCode::SUCCESS
}
