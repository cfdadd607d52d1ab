//! A running Virtualization.framework VM.
//!
//! The framework's rule: a `VZVirtualMachine` is used only on the dispatch
//! queue it was created with. The VM gets a private serial queue; every
//! call to it is submitted there with `exec_sync`, and completion handlers,
//! which the framework also runs there, only record their result in a
//! [`Completion`] that the calling thread waits on outside the queue, so
//! the queue is never blocked waiting for itself.

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use block2::RcBlock;
use dispatch2::{DispatchQueue, DispatchQueueAttr, DispatchRetained};
use objc2::rc::Retained;
use objc2::AllocAnyThread;
use objc2_foundation::NSError;
use objc2_virtualization::{
    VZVirtioSocketConnection, VZVirtioSocketDevice, VZVirtualMachine,
    VZVirtualMachineConfiguration, VZVirtualMachineState,
};
use vmette_core::engine::{ConsoleTail, EngineError, Vm};

use super::configuration::describe;
use crate::plan::DevicePlan;

/// How long the framework gets to start the VM.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a requested (clean) stop may take before the VM is forced off.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// How much of the guest console is kept for error reports.
pub const CONSOLE_TAIL: usize = 4096;

/// A value set once from a completion handler and awaited elsewhere.
struct Completion<T> {
    value: Mutex<Option<T>>,
    ready: Condvar,
}

impl<T> Completion<T> {
    fn new() -> Arc<Completion<T>> {
        Arc::new(Completion {
            value: Mutex::new(None),
            ready: Condvar::new(),
        })
    }

    fn set(&self, value: T) {
        *self.value.lock().unwrap_or_else(PoisonError::into_inner) = Some(value);
        self.ready.notify_all();
    }

    fn wait(&self, timeout: Duration) -> Option<T> {
        let guard = self.value.lock().unwrap_or_else(PoisonError::into_inner);
        let (mut guard, _) = self
            .ready
            .wait_timeout_while(guard, timeout, |value| value.is_none())
            .unwrap_or_else(PoisonError::into_inner);
        guard.take()
    }
}

/// The VM object, confined to its queue.
struct QueueBound(Retained<VZVirtualMachine>);

// SAFETY: the VM is only ever touched inside closures submitted to its own
// serial queue (`VzVm::on_queue`), which is what the framework requires;
// moving the handle between threads does not touch the object.
unsafe impl Send for QueueBound {}
// SAFETY: as above: shared references are only dereferenced on the queue.
unsafe impl Sync for QueueBound {}

/// A running VM.
pub struct VzVm {
    queue: DispatchRetained<DispatchQueue>,
    /// `None` only while being dropped, when the object is released on its
    /// queue.
    machine: Option<QueueBound>,
    console: ConsoleTail,
    control_port: u32,
}

/// The message of an `NSError*` a completion handler received, if any.
fn error_message(error: *mut NSError) -> Option<String> {
    // SAFETY: the framework passes either null or a valid NSError that
    // lives for the duration of the handler.
    unsafe { error.as_ref() }.map(describe)
}

impl VzVm {
    /// Creates the VM on a fresh serial queue and starts it.
    pub fn start(
        configuration: &VZVirtualMachineConfiguration,
        plan: &DevicePlan,
        console: ConsoleTail,
    ) -> Result<VzVm, EngineError> {
        let queue = DispatchQueue::new("dev.vmette.vm", DispatchQueueAttr::SERIAL);
        // SAFETY: the VM is created bound to `queue` and used only there.
        let machine = unsafe {
            VZVirtualMachine::initWithConfiguration_queue(
                VZVirtualMachine::alloc(),
                configuration,
                &queue,
            )
        };
        let vm = VzVm {
            queue,
            machine: Some(QueueBound(machine)),
            console,
            control_port: plan.control_port,
        };
        let started = Completion::new();
        let done = Arc::clone(&started);
        vm.on_queue((), move |machine| {
            let handler = RcBlock::new(move |error: *mut NSError| done.set(error_message(error)));
            // SAFETY: called on the VM's queue with a handler that only
            // records the outcome.
            unsafe { machine.startWithCompletionHandler(&handler) };
        });
        match started.wait(START_TIMEOUT) {
            Some(None) => Ok(vm),
            Some(Some(message)) => Err(EngineError::EarlyExit {
                program: "Virtualization.framework".into(),
                output: message,
            }),
            None => Err(EngineError::EarlyExit {
                program: "Virtualization.framework".into(),
                output: format!("the VM did not start within {START_TIMEOUT:?}"),
            }),
        }
    }

    /// Runs `work` on the VM's queue and returns its result; `None` once
    /// the VM object has been released.
    fn try_on_queue<R: Send>(&self, work: impl FnOnce(&VZVirtualMachine) -> R + Send) -> Option<R> {
        let machine = self.machine.as_ref()?;
        let mut result = None;
        let slot = &mut result;
        self.queue.exec_sync(move || *slot = Some(work(&machine.0)));
        result
    }

    /// Like [`VzVm::try_on_queue`], with `fallback` once the VM is released.
    fn on_queue<R: Send>(
        &self,
        fallback: R,
        work: impl FnOnce(&VZVirtualMachine) -> R + Send,
    ) -> R {
        self.try_on_queue(work).unwrap_or(fallback)
    }

    fn state(&self) -> VZVirtualMachineState {
        // SAFETY: read on the VM's queue.
        self.on_queue(VZVirtualMachineState::Stopped, |machine| unsafe {
            machine.state()
        })
    }

    /// One attempt to connect to the guest agent's port. The answer is
    /// awaited until `deadline`: the guest accepts a single connection, so
    /// one that completed after the host stopped waiting would be lost.
    fn try_connect(&self, deadline: Instant) -> Result<OwnedFd, String> {
        let connected = Completion::new();
        let done = Arc::clone(&connected);
        let port = self.control_port;
        self.on_queue((), move |machine| {
            // SAFETY: the socket devices are read on the VM's queue.
            let device = unsafe { machine.socketDevices() }
                .firstObject()
                .and_then(|device| device.downcast::<VZVirtioSocketDevice>().ok());
            let Some(device) = device else {
                done.set(Err("the VM has no virtio socket device".to_string()));
                return;
            };
            let handler = RcBlock::new(
                move |connection: *mut VZVirtioSocketConnection, error: *mut NSError| {
                    // SAFETY: the framework passes a valid connection or
                    // null, live for the duration of the handler.
                    let outcome = match unsafe { connection.as_ref() } {
                        Some(connection) => {
                            // The connection closes its descriptor when it is
                            // released; keep a duplicate of our own.
                            // SAFETY: fileDescriptor is an open socket.
                            let fd = unsafe { libc::dup(connection.fileDescriptor()) };
                            if fd < 0 {
                                Err(std::io::Error::last_os_error().to_string())
                            } else {
                                // SAFETY: dup returned a new descriptor we own.
                                Ok(unsafe { OwnedFd::from_raw_fd(fd) })
                            }
                        }
                        None => Err(error_message(error).unwrap_or_default()),
                    };
                    done.set(outcome);
                },
            );
            // SAFETY: called on the VM's queue with a handler that only
            // records the outcome.
            unsafe { device.connectToPort_completionHandler(port, &handler) };
        });
        connected
            .wait(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|| Err("no answer from the framework".into()))
    }

    /// Asks the guest to stop, then forces the VM off after a grace period.
    fn stop(&mut self, grace: Duration) {
        if self.has_exited() {
            return;
        }
        let requested = self.on_queue(false, |machine| {
            // SAFETY: called on the VM's queue.
            unsafe { machine.requestStopWithError() }.is_ok()
        });
        if requested && self.wait_exit(grace) {
            return;
        }
        let stopped = Completion::new();
        let done = Arc::clone(&stopped);
        self.on_queue((), move |machine| {
            // SAFETY: called on the VM's queue.
            if unsafe { machine.canStop() } {
                let handler =
                    RcBlock::new(move |error: *mut NSError| done.set(error_message(error)));
                // SAFETY: called on the VM's queue with a recording handler.
                unsafe { machine.stopWithCompletionHandler(&handler) };
            } else {
                done.set(None);
            }
        });
        if let Some(Some(message)) = stopped.wait(STOP_GRACE) {
            tracing::warn!("the VM did not stop cleanly: {message}");
        }
    }
}

impl Vm for VzVm {
    fn connect_control(&mut self, deadline: Instant) -> Result<UnixStream, EngineError> {
        let started = Instant::now();
        loop {
            // The guest agent listens only once its modules are loaded;
            // until then the framework refuses the connection.
            match self.try_connect(deadline) {
                Ok(fd) => return Ok(UnixStream::from(fd)),
                Err(reason) => tracing::trace!("control port not ready: {reason}"),
            }
            if self.has_exited() {
                return Err(EngineError::EarlyExit {
                    program: "the guest".into(),
                    output: self.console_tail(),
                });
            }
            if Instant::now() >= deadline {
                return Err(EngineError::ControlTimeout(started.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn has_exited(&mut self) -> bool {
        matches!(
            self.state(),
            VZVirtualMachineState::Stopped | VZVirtualMachineState::Error
        )
    }

    fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.has_exited() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    fn kill(&mut self) {
        self.stop(Duration::ZERO);
    }

    fn powered_off_by_guest(&mut self) -> bool {
        // The framework reports a guest's own power-off as Stopped and a
        // failure of the machine as Error.
        matches!(self.state(), VZVirtualMachineState::Stopped)
    }

    fn console_tail(&self) -> String {
        self.console.text()
    }

    fn accelerator(&self) -> String {
        "Virtualization.framework (hardware)".into()
    }
}

impl Drop for VzVm {
    fn drop(&mut self) {
        self.stop(STOP_GRACE);
        // Release the VM object on its own queue too.
        if let Some(machine) = self.machine.take() {
            self.queue.exec_sync(move || drop(machine));
        }
    }
}
