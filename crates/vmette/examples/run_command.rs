//! Runs a command in a microVM and prints what it wrote.
//!
//! ```text
//! cargo run --release -p vmette --example run_command -- uname -a
//! ```

use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let mut command: Vec<String> = std::env::args().skip(1).collect();
    if command.is_empty() {
        command = vec!["uname".into(), "-a".into()];
    }
    let mut config = vmette::Config::new(command);
    config.timeout = Some(Duration::from_secs(60));
    match vmette::run(&config) {
        Ok(output) => {
            print!("{}", String::from_utf8_lossy(&output.stdout));
            eprint!("{}", String::from_utf8_lossy(&output.stderr));
            ExitCode::from(output.exit_code().clamp(0, 255) as u8)
        }
        Err(error) => {
            let mut message = error.to_string();
            let mut source = std::error::Error::source(&error);
            while let Some(cause) = source {
                message.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            eprintln!("error: {message}");
            ExitCode::from(125)
        }
    }
}
