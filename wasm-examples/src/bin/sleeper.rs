//! Runs forever: sleeps for the period given in milliseconds (default 1000), then prints a tick.
fn main() {
    let ms: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let mut n: u64 = 0;
    loop {
        std::thread::sleep(std::time::Duration::from_millis(ms));
        n += 1;
        println!("tick {n}");
    }
}
