//! Burns CPU forever in a loop with no host calls (xorshift, so the loop cannot be optimised
//! away). With an argument N it stops after N iterations and prints the result.
fn main() {
    let limit: Option<u64> = std::env::args().nth(1).and_then(|a| a.parse().ok());
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut i: u64 = 0;
    loop {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        i = i.wrapping_add(1);
        if Some(i) == limit {
            println!("spun {i} iterations: {x}");
            return;
        }
    }
}
