//! Prints its arguments and environment, sorted, then exits 0.
fn main() {
    let args: Vec<String> = std::env::args().collect();
    println!("hello from flotilla: args={args:?}");
    let mut env: Vec<(String, String)> = std::env::vars().collect();
    env.sort();
    for (k, v) in env {
        println!("{k}={v}");
    }
}
