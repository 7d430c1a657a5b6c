//! Exits with the code given as its first argument (default 0), after one stdout line.
fn main() {
    let code: i32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(0);
    println!("exiting with {code}");
    std::process::exit(code);
}
