//! A function: copies stdin to stdout in upper case.
use std::io::{Read, Write};

fn main() {
    let mut input = String::new();
    if std::io::stdin().read_to_string(&mut input).is_err() {
        std::process::exit(1);
    }
    let mut out = std::io::stdout();
    let _ = out.write_all(input.to_uppercase().as_bytes());
}
