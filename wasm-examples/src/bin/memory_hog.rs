//! Allocates and touches 1 MiB chunks until allocation fails, printing its progress; then exits 3.
fn main() {
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut chunk: Vec<u8> = Vec::new();
        if chunk.try_reserve_exact(1 << 20).is_err() {
            eprintln!("allocation failed after {} MiB", chunks.len());
            std::process::exit(3);
        }
        chunk.resize(1 << 20, 0xa5);
        chunks.push(chunk);
        if chunks.len().is_multiple_of(16) {
            println!("holding {} MiB", chunks.len());
        }
    }
}
