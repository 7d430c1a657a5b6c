//! Writes `hello from file_writer` into `<dir>/out.txt` (dir = first argument, default /data),
//! reads it back, and tries to read a host file outside its volumes (argument 2, default
//! /etc/passwd); prints `escape blocked` or `escape succeeded`. Exits 1 if its own write failed.
use std::io::Write;

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args.next().unwrap_or_else(|| "/data".into());
    let outside = args.next().unwrap_or_else(|| "/etc/passwd".into());
    let path = format!("{dir}/out.txt");
    let written =
        std::fs::File::create(&path).and_then(|mut f| f.write_all(b"hello from file_writer\n"));
    match written {
        Ok(()) => println!("wrote {path}"),
        Err(e) => {
            println!("write to {path} failed: {e}");
            std::process::exit(1);
        }
    }
    match std::fs::read_to_string(&path) {
        Ok(s) => println!("read back: {}", s.trim()),
        Err(e) => println!("read back failed: {e}"),
    }
    for candidate in [outside.clone(), format!("{dir}/../../../../{outside}")] {
        match std::fs::read(&candidate) {
            Ok(_) => println!("escape succeeded: {candidate}"),
            Err(e) => println!("escape blocked: {candidate}: {e}"),
        }
    }
}
