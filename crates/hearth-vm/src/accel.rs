//! Choosing the accelerator: hardware KVM when it can boot our guest,
//! software emulation (TCG) otherwise.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

impl Accel {
    /// QEMU's `-accel` and `-cpu` arguments.
    pub fn qemu_args(&self) -> [&'static str; 4] {
        match self {
            Accel::Kvm => ["-accel", "kvm", "-cpu", "host"],
            Accel::Tcg => ["-accel", "tcg", "-cpu", "max"],
        }
    }
}

/// The host's TSC frequency in kHz, from /proc/cpuinfo. Under TCG the guest
/// kernel is told it (`tsc_early_khz`) because calibrating against the
/// emulated PIT hangs about a third of boots.
pub fn host_tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0) as u64)
}

/// Probes KVM with a short boot (via `probe`) when /dev/kvm is usable;
/// falls back to TCG. `forced` skips the probe.
pub async fn detect_accel<F, Fut>(forced: Option<Accel>, probe: F) -> Accel
where
    F: FnOnce(Accel) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    if let Some(a) = forced {
        return a;
    }
    let kvm_usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if kvm_usable && probe(Accel::Kvm).await {
        return Accel::Kvm;
    }
    Accel::Tcg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn forced_accelerator_skips_the_probe() {
        let a = detect_accel(Some(Accel::Tcg), |_| async {
            panic!("no probe when forced")
        })
        .await;
        assert_eq!(a, Accel::Tcg);
    }

    #[tokio::test]
    async fn failed_kvm_probe_falls_back_to_tcg() {
        assert_eq!(detect_accel(None, |_| async { false }).await, Accel::Tcg);
    }

    #[test]
    fn tsc_frequency_is_read_from_cpuinfo() {
        let khz = host_tsc_khz().expect("cpu MHz in /proc/cpuinfo");
        assert!(khz > 100_000, "{khz}");
    }
}
