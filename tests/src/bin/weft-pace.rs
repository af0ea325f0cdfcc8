//! weft-pace: copies a file to stdout at a fixed rate, so a transfer lasts long
//! enough for something to happen during it.
//!
//! ```text
//! weft-pace FILE BYTES_PER_SEC | socat -u STDIN TCP:host:port
//! ```

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(path), Some(rate)) = (args.get(1), args.get(2).and_then(|r| r.parse::<u64>().ok()))
    else {
        eprintln!("usage: weft-pace FILE BYTES_PER_SEC");
        return ExitCode::from(2);
    };
    match pace(path, rate.max(1)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-pace: {path}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn pace(path: &str, rate: u64) -> std::io::Result<()> {
    let mut f = std::fs::File::open(path)?;
    let mut out = std::io::stdout().lock();
    // About 100 chunks per second.
    let chunk = usize::try_from((rate / 100).clamp(512, 1 << 20)).unwrap_or(1 << 16);
    let mut buf = vec![0u8; chunk];
    let start = Instant::now();
    let mut sent = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
        out.flush()?;
        sent += n as u64;
        let due = Duration::from_secs_f64(sent as f64 / rate as f64);
        let el = start.elapsed();
        if due > el {
            std::thread::sleep(due - el);
        }
    }
    Ok(())
}
