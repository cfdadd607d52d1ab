//! Choosing between KVM and TCG before QEMU starts.
//!
//! QEMU's own probe is not enough: on a nested `kvm-pvm` host, `/dev/kvm`
//! opens and `-accel kvm` starts, then the guest hangs without a word. So
//! KVM is chosen only when the CPU advertises hardware virtualisation, the
//! device opens read-write, and no `kvm_pvm` module is loaded.

use std::fs::OpenOptions;
use std::path::Path;

use vmette_core::{Accel, EngineError};

/// The accelerator chosen for a VM, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// KVM.
    Kvm(String),
    /// TCG software emulation.
    Tcg(String),
}

impl Choice {
    /// `kvm` or `tcg`.
    pub fn name(&self) -> &'static str {
        match self {
            Choice::Kvm(_) => "kvm",
            Choice::Tcg(_) => "tcg",
        }
    }

    /// Why this accelerator was chosen.
    pub fn reason(&self) -> &str {
        match self {
            Choice::Kvm(reason) | Choice::Tcg(reason) => reason,
        }
    }
}

/// Decides the accelerator for `preference`.
pub fn choose(preference: Accel) -> Result<Choice, EngineError> {
    match preference {
        Accel::Emulation => Ok(Choice::Tcg("requested".into())),
        Accel::Hardware => match kvm_usable() {
            Ok(()) => Ok(Choice::Kvm("requested".into())),
            Err(reason) => Err(EngineError::AccelUnavailable {
                accel: "kvm",
                reason,
            }),
        },
        Accel::Auto => Ok(match kvm_usable() {
            Ok(()) => Choice::Kvm("/dev/kvm is usable".into()),
            Err(reason) => Choice::Tcg(format!("KVM is not usable: {reason}")),
        }),
    }
}

/// `Ok` when KVM will really run a guest here; otherwise why not.
pub fn kvm_usable() -> Result<(), String> {
    if !cfg!(target_arch = "x86_64") {
        return Err("only checked on x86_64".into());
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Err(
            "/dev/kvm is a nested kvm-pvm device, which does not boot stock kernels".into(),
        );
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if !cpu_has_virtualization(&cpuinfo) {
        return Err("the CPU advertises no vmx or svm".into());
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| format!("cannot open /dev/kvm: {e}"))
}

fn cpu_has_virtualization(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|line| line.starts_with("flags"))
        .flat_map(|line| line.split_whitespace())
        .any(|flag| flag == "vmx" || flag == "svm")
}

/// The host TSC rate in kHz, from `/proc/cpuinfo`. Under TCG the guest
/// reads the host's TSC, and an early calibration against the emulated PIT
/// sometimes fails for good; telling the kernel the rate avoids that.
pub fn host_tsc_khz() -> Option<u64> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    tsc_khz_from(&cpuinfo)
}

fn tsc_khz_from(cpuinfo: &str) -> Option<u64> {
    let mhz: f64 = cpuinfo
        .lines()
        .find(|line| line.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    (mhz > 0.0).then(|| (mhz * 1000.0).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_vmx_and_svm_flags_only_as_whole_words() {
        assert!(cpu_has_virtualization("flags\t: fpu vmx sse\n"));
        assert!(cpu_has_virtualization("flags\t: svm\n"));
        assert!(!cpu_has_virtualization("flags\t: fpu vmxnot sse\n"));
        assert!(!cpu_has_virtualization(""));
    }

    #[test]
    fn reads_the_tsc_rate() {
        assert_eq!(tsc_khz_from("cpu MHz\t\t: 2599.998\n"), Some(2_599_998));
        assert_eq!(tsc_khz_from("nothing"), None);
        assert_eq!(tsc_khz_from("cpu MHz : fast"), None);
    }

    #[test]
    fn emulation_is_always_available() {
        assert_eq!(choose(Accel::Emulation).expect("tcg").name(), "tcg");
    }
}
