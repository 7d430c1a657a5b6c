//! A small multi-call program for exec tests (the command is argv[0] if it names one, else
//! argv[1]): `serve [ms]` runs forever (sleeping, printing a
//! tick), `echo ARGS...` prints its arguments, `cat PATH` prints a file, `env NAME` prints a
//! variable, `exit N` exits with N, `spin` loops forever. It also exports functions an exec can
//! call by name: `healthz` (prints `healthy`, returns 0), `unhealthy` (returns 3), `crash`
//! (traps) and `busy` (loops forever).
use std::io::Read;

const COMMANDS: [&str; 6] = ["serve", "echo", "cat", "env", "exit", "spin"];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // Busybox style: the command is argv[0] when that names one (`exec -- echo hi`), else
    // argv[1] (`toolbox echo hi`).
    let argv0 = args.first().map(String::as_str).unwrap_or("");
    let argv0 = argv0.rsplit('/').next().unwrap_or(argv0);
    let skip = if COMMANDS.contains(&argv0) { 0 } else { 1 };
    let rest = args.get(skip + 1..).unwrap_or_default();
    match args.get(skip).map(|a| a.rsplit('/').next().unwrap_or(a)) {
        Some("serve") | None => {
            let ms = rest.first().and_then(|a| a.parse().ok()).unwrap_or(1000);
            let mut n: u64 = 0;
            loop {
                std::thread::sleep(std::time::Duration::from_millis(ms));
                n += 1;
                println!("tick {n}");
            }
        }
        Some("echo") => println!("{}", rest.join(" ")),
        Some("cat") => {
            let path = rest.first().map(String::as_str).unwrap_or("/dev/stdin");
            let mut s = String::new();
            let read = std::fs::File::open(path).and_then(|mut f| f.read_to_string(&mut s));
            match read {
                Ok(_) => print!("{s}"),
                Err(e) => {
                    eprintln!("cat: {path}: {e}");
                    std::process::exit(1);
                }
            }
        }
        Some("env") => {
            let name = rest.first().map(String::as_str).unwrap_or("");
            match std::env::var(name) {
                Ok(v) => println!("{v}"),
                Err(_) => std::process::exit(1),
            }
        }
        Some("exit") => {
            std::process::exit(rest.first().and_then(|a| a.parse().ok()).unwrap_or(1));
        }
        Some("spin") => spin(),
        Some(other) => {
            eprintln!("toolbox: unknown command {other:?}");
            std::process::exit(127);
        }
    }
}

fn spin() -> ! {
    let mut x: u64 = 1;
    loop {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        std::hint::black_box(x);
    }
}

/// A health check an exec probe can call by name.
#[allow(
    unsafe_code,
    reason = "exporting a function from the module needs no_mangle"
)]
#[unsafe(no_mangle)]
pub extern "C" fn healthz() -> i32 {
    println!("healthy");
    0
}

/// A failing health check.
#[allow(
    unsafe_code,
    reason = "exporting a function from the module needs no_mangle"
)]
#[unsafe(no_mangle)]
pub extern "C" fn unhealthy() -> i32 {
    eprintln!("not healthy");
    3
}

/// Traps (an abort is `unreachable` in wasm).
#[allow(
    unsafe_code,
    reason = "exporting a function from the module needs no_mangle"
)]
#[unsafe(no_mangle)]
pub extern "C" fn crash() {
    std::process::abort();
}

/// Never returns.
#[allow(
    unsafe_code,
    reason = "exporting a function from the module needs no_mangle"
)]
#[unsafe(no_mangle)]
pub extern "C" fn busy() {
    spin();
}
