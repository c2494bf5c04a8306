//! What a process costs, read from `/proc`: CPU time, resident memory (now and its peak), and
//! open sockets. Linux only, like the machines Tutela's services run on.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// One reading of a process.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProcSample {
    /// User + system CPU seconds since the process started.
    pub cpu_seconds: f64,
    /// Resident set size now (bytes).
    pub rss_bytes: u64,
    /// The kernel's high-water mark of the resident set (`VmHWM`, bytes).
    pub rss_peak_bytes: u64,
    /// Open file descriptors that are sockets (the listener and every connection).
    pub sockets: u64,
    pub threads: u64,
}

/// Reads `/proc/<pid>`; `None` once the process is gone.
pub fn sample(pid: u32) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields count from after it.
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name and state.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    let threads = status
        .lines()
        .find(|l| l.starts_with("Threads:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let sockets = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.flatten()
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"))
                })
                .count() as u64
        })
        .unwrap_or(0);
    Some(ProcSample {
        cpu_seconds: ticks as f64 / clock_ticks_per_second(),
        rss_bytes: kib("VmRSS:"),
        rss_peak_bytes: kib("VmHWM:"),
        sockets,
        threads,
    })
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions; it returns -1 for an unknown name.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Samples a process every `every` on a thread of its own, keeping the peaks since the last
/// [`Sampler::take`]: a round's peak RSS and peak socket count.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    rss_peak: Arc<AtomicU64>,
    sockets_peak: Arc<AtomicU64>,
    handle: Option<std::thread::JoinHandle<()>>,
}

/// The peaks since the last take.
#[derive(Clone, Copy, Debug, Default)]
pub struct Peaks {
    pub rss_bytes: u64,
    pub sockets: u64,
}

impl Sampler {
    pub fn start(pid: u32, every: Duration) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let rss_peak = Arc::new(AtomicU64::new(0));
        let sockets_peak = Arc::new(AtomicU64::new(0));
        let (s, r, k) = (stop.clone(), rss_peak.clone(), sockets_peak.clone());
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Some(x) = sample(pid) else { break };
                r.fetch_max(x.rss_bytes, Ordering::Relaxed);
                k.fetch_max(x.sockets, Ordering::Relaxed);
                std::thread::sleep(every);
            }
        });
        Sampler {
            stop,
            rss_peak,
            sockets_peak,
            handle: Some(handle),
        }
    }

    /// The peaks since the last call, and starts new ones.
    pub fn take(&self) -> Peaks {
        Peaks {
            rss_bytes: self.rss_peak.swap(0, Ordering::Relaxed),
            sockets: self.sockets_peak.swap(0, Ordering::Relaxed),
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Raises this process's soft limit on open files to its hard limit (children inherit it): a
/// thousand agents hold a thousand connections, and so does the coordinator they talk to.
/// Returns the soft limit now in force.
pub fn raise_open_files_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write/read only the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_sampled() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = sample(std::process::id()).unwrap();
        assert!(s.rss_bytes > 0 && s.rss_peak_bytes >= s.rss_bytes, "{s:?}");
        assert!(s.sockets >= 1, "{s:?}");
        assert!(s.threads >= 1, "{s:?}");
        drop(listener);
        assert!(sample(u32::MAX).is_none());
    }
}
