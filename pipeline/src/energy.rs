//! Host energy: measured from RAPL (`/sys/class/powercap/*/energy_uj`) where
//! the kernel exposes it, otherwise estimated as this process's CPU time ×
//! a configurable number of watts per busy core. Always labelled.

use std::path::PathBuf;

/// Where a host energy figure comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EnergySource {
    Measured,
    Estimate,
}

impl EnergySource {
    /// "measured" or "estimate".
    pub fn label(self) -> &'static str {
        match self {
            EnergySource::Measured => "measured",
            EnergySource::Estimate => "estimate",
        }
    }
}

/// Reads cumulative host energy in joules.
#[derive(Clone, Debug)]
pub struct HostEnergy {
    rapl: Vec<PathBuf>,
    watts_per_core: f64,
}

impl HostEnergy {
    /// Probes RAPL; `watts_per_core` is used when it is not readable.
    pub fn new(watts_per_core: f64) -> Self {
        let mut rapl = Vec::new();
        if let Ok(dir) = std::fs::read_dir("/sys/class/powercap") {
            for e in dir.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                // Top-level packages only (intel-rapl:0), not sub-zones (intel-rapl:0:0).
                if name.matches(':').count() == 1 {
                    let p = e.path().join("energy_uj");
                    if std::fs::read_to_string(&p).is_ok_and(|s| s.trim().parse::<u64>().is_ok()) {
                        rapl.push(p);
                    }
                }
            }
        }
        HostEnergy {
            rapl,
            watts_per_core,
        }
    }

    /// Whether figures are measured or estimated.
    pub fn source(&self) -> EnergySource {
        if self.rapl.is_empty() {
            EnergySource::Estimate
        } else {
            EnergySource::Measured
        }
    }

    /// Cumulative joules (a counter: take differences).
    pub fn joules(&self) -> f64 {
        if self.rapl.is_empty() {
            return process_cpu_seconds() * self.watts_per_core;
        }
        self.rapl
            .iter()
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .filter_map(|s| s.trim().parse::<u64>().ok())
            .map(|uj| uj as f64 / 1e6)
            .sum()
    }
}

/// User + system CPU seconds of this process: from the kernel's
/// process CPU-time clock (nanoseconds), else from /proc/self/stat (in
/// 10 ms ticks, which made short requests' host energy 0.0 J or 0.1 J).
pub fn process_cpu_seconds() -> f64 {
    #[cfg(unix)]
    {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec into the valid `ts`.
        if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } == 0 {
            return ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9;
        }
    }
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // `rest` starts at field 3 (state), so field n is index n - 3.
    (ticks(11) + ticks(12)) / 100.0
}

/// Peak resident set size of this process in bytes (VmHWM).
pub fn peak_rss_bytes() -> u64 {
    proc_status_kib("VmHWM:") * 1024
}

/// Current resident set size in bytes (VmRSS).
pub fn rss_bytes() -> u64 {
    proc_status_kib("VmRSS:") * 1024
}

fn proc_status_kib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Process CPU time is read finer than /proc's 10 ms ticks, so a short
    /// request's host energy is not rounded to 0 or 0.1 J.
    #[test]
    fn cpu_time_is_finer_than_ticks() {
        // Work until 3 ms of CPU time have passed (a loaded machine may
        // deschedule this thread for a while), reading the clock as it goes.
        let start = std::time::Instant::now();
        let first = process_cpu_seconds();
        let mut seen = vec![first];
        while seen.last().unwrap() - first < 0.003 && start.elapsed().as_secs() < 5 {
            let t = process_cpu_seconds();
            if t != *seen.last().unwrap() {
                seen.push(t);
            }
        }
        // Ticks of 10 ms would give at most one change in 3 ms of CPU time.
        assert!(
            seen.len() > 10,
            "only {} CPU-time readings: {seen:?}",
            seen.len()
        );
        assert!(seen.windows(2).all(|w| w[1] > w[0]), "{seen:?}");
    }
}
