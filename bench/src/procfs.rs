//! What the kernel says about a process: resident memory from
//! `/proc/PID/status` and `smaps_rollup`, CPU time from `/proc/PID/stat`.

use std::collections::BTreeMap;
use std::sync::OnceLock;

/// Clock ticks per second (`getconf CLK_TCK`), 100 when it cannot be asked.
pub fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// The `/proc` entry of a process: a pid, or `self`.
#[derive(Clone, Debug)]
pub struct Proc(String);

impl Proc {
    pub fn pid(pid: u32) -> Self {
        Self(pid.to_string())
    }
    pub fn me() -> Self {
        Self("self".into())
    }

    fn read(&self, file: &str) -> Option<String> {
        std::fs::read_to_string(format!("/proc/{}/{file}", self.0)).ok()
    }

    /// A `kB` field of `/proc/PID/status`, in bytes.
    fn status_bytes(&self, field: &str) -> Option<u64> {
        let status = self.read("status")?;
        status.lines().find_map(|line| {
            let rest = line.strip_prefix(field)?.strip_prefix(':')?;
            let kb: u64 = rest.split_whitespace().next()?.parse().ok()?;
            Some(kb * 1024)
        })
    }

    /// Resident memory (`VmRSS`), in bytes.
    pub fn rss(&self) -> Option<u64> {
        self.status_bytes("VmRSS")
    }

    /// Resident anonymous memory (`RssAnon`: heap, stacks), in bytes.
    pub fn rss_anon(&self) -> Option<u64> {
        self.status_bytes("RssAnon")
    }

    /// Threads of the process.
    pub fn threads(&self) -> Option<u64> {
        let status = self.read("status")?;
        status.lines().find_map(|line| {
            line.strip_prefix("Threads:")
                .and_then(|v| v.trim().parse().ok())
        })
    }

    /// User plus system CPU time so far, in seconds.
    pub fn cpu_secs(&self) -> Option<f64> {
        let stat = self.read("stat")?;
        // The command name may hold spaces and parentheses: count from the last ')'.
        let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
        // Fields 14 and 15 of proc(5), counted from `state` (field 3) here.
        let utime: f64 = fields.get(11)?.parse().ok()?;
        let stime: f64 = fields.get(12)?.parse().ok()?;
        Some((utime + stime) / clock_ticks())
    }

    /// The `kB` fields of `/proc/PID/smaps_rollup`, in bytes.
    pub fn smaps_rollup(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        if let Some(text) = self.read("smaps_rollup") {
            for line in text.lines().skip(1) {
                let mut parts = line.split_whitespace();
                if let (Some(key), Some(value), Some("kB")) =
                    (parts.next(), parts.next(), parts.next())
                    && let Ok(kb) = value.parse::<u64>()
                {
                    out.insert(key.trim_end_matches(':').to_owned(), kb * 1024);
                }
            }
        }
        out
    }

    /// Open file descriptors.
    pub fn open_fds(&self) -> Option<u64> {
        std::fs::read_dir(format!("/proc/{}/fd", self.0))
            .ok()
            .map(|d| d.count() as u64)
    }
}

/// CPU used by a process over an interval.
pub struct CpuMeter {
    proc: Proc,
    start_cpu: f64,
    start: std::time::Instant,
}

impl CpuMeter {
    pub fn start(proc: &Proc) -> Self {
        Self {
            proc: proc.clone(),
            start_cpu: proc.cpu_secs().unwrap_or(0.0),
            start: std::time::Instant::now(),
        }
    }

    /// (CPU seconds used, wall seconds elapsed) since `start`.
    pub fn read(&self) -> (f64, f64) {
        let cpu = self.proc.cpu_secs().unwrap_or(self.start_cpu) - self.start_cpu;
        (cpu, self.start.elapsed().as_secs_f64())
    }
}

/// Busy jiffies of the whole machine (all cores, from `/proc/stat`): user,
/// nice, system, irq, softirq and steal; idle and iowait left out.
fn machine_busy_jiffies() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    fields
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| *v)
        .sum()
}

/// Busy CPU time of the whole machine, in seconds.
pub fn machine_busy_secs() -> f64 {
    machine_busy_jiffies() as f64 / clock_ticks()
}

/// CPU used by the server, by the load generator, and by everything else,
/// over an interval: everything else is noise in a measurement.
pub struct Meters {
    server: CpuMeter,
    load: CpuMeter,
    machine: f64,
}

impl Meters {
    pub fn start(server: &Proc) -> Self {
        Self {
            server: CpuMeter::start(server),
            load: CpuMeter::start(&Proc::me()),
            machine: machine_busy_secs(),
        }
    }

    /// Server CPU seconds, load generator CPU seconds, other processes' CPU
    /// seconds, wall seconds.
    pub fn read(&self) -> (f64, f64, f64, f64) {
        let (server, secs) = self.server.read();
        let (load, _) = self.load.read();
        let machine = machine_busy_secs() - self.machine;
        (server, load, (machine - server - load).max(0.0), secs)
    }
}
