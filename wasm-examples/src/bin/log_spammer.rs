//! Writes N numbered lines (first argument, default 100000) to stdout, every tenth to stderr.
fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    for i in 0..n {
        if i % 10 == 0 {
            eprintln!("spam line {i} on stderr");
        } else {
            println!("spam line {i} with some padding to make it longer than a few bytes");
        }
    }
}
