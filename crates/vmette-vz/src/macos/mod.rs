//! The engine on a Mac: framework objects from a [`DevicePlan`], and a VM
//! driven on its own dispatch queue.

mod configuration;
mod machine;

use objc2_virtualization::{VZVirtualMachine, VZVirtualMachineConfiguration};
use vmette_core::engine::{Check, ConsoleTail, Engine, EngineError, Vm, VmSpec};
use vmette_core::process::Watchdog;

use crate::plan::{self, DevicePlan, Limits};

/// The Virtualization.framework engine.
#[derive(Debug, Clone, Default)]
pub struct VzEngine {
    _private: (),
}

impl VzEngine {
    /// The engine.
    pub fn new() -> VzEngine {
        VzEngine::default()
    }
}

/// The framework's limits on this Mac.
fn limits() -> Limits {
    // SAFETY: class properties without arguments; callable from any thread.
    unsafe {
        Limits {
            cpus: VZVirtualMachineConfiguration::minimumAllowedCPUCount()
                ..=VZVirtualMachineConfiguration::maximumAllowedCPUCount(),
            memory_bytes: VZVirtualMachineConfiguration::minimumAllowedMemorySize()
                ..=VZVirtualMachineConfiguration::maximumAllowedMemorySize(),
        }
    }
}

impl Engine for VzEngine {
    fn name(&self) -> &'static str {
        "vz"
    }

    fn start(&self, spec: &VmSpec, _watchdog: &Watchdog) -> Result<Box<dyn Vm>, EngineError> {
        // The VM runs inside this process, so it dies with it: there is no
        // helper process for the watchdog to guard.
        let plan: DevicePlan = plan::plan(spec, &limits())?;
        let (console_read, console_write) = std::io::pipe().map_err(|source| EngineError::Io {
            context: "cannot create the console pipe".into(),
            source,
        })?;
        let console =
            ConsoleTail::capture(console_read, machine::CONSOLE_TAIL).map_err(|source| {
                EngineError::Io {
                    context: "cannot read the guest console".into(),
                    source,
                }
            })?;
        let configuration = configuration::build(&plan, console_write.into())?;
        let machine = machine::VzVm::start(&configuration, &plan, console)?;
        Ok(Box::new(machine))
    }

    fn guest_modules(&self) -> &'static [&'static str] {
        plan::GUEST_MODULES
    }

    fn diagnose(&self) -> Vec<Check> {
        // SAFETY: a class property without arguments.
        let supported = unsafe { VZVirtualMachine::isSupported() };
        let limits = limits();
        vec![
            Check {
                name: "framework".into(),
                detail: if supported {
                    "Virtualization.framework supports VMs on this Mac".into()
                } else {
                    "Virtualization.framework does not support VMs here".into()
                },
                fix: (!supported)
                    .then(|| "run on Apple silicon or a Mac with hardware virtualisation".into()),
            },
            Check {
                name: "limits".into(),
                detail: format!(
                    "{} to {} CPUs, {} MiB to {} MiB",
                    limits.cpus.start(),
                    limits.cpus.end(),
                    limits.memory_bytes.start() / (1024 * 1024),
                    limits.memory_bytes.end() / (1024 * 1024)
                ),
                fix: None,
            },
        ]
    }
}
