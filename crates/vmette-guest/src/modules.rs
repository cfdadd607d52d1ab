//! Loads the kernel modules the initramfs carries.
//!
//! The host resolved their dependencies when it built the initramfs and
//! wrote the load order to `/vmette/modules`, one file name per line, so the
//! guest needs no `modules.dep` and no `modprobe`. The network device's
//! driver is listed apart, in `/vmette/modules.net`, and loaded only for a
//! guest that has a network: most have none, and a boot without it is
//! shorter.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::path::Path;

use nix::errno::Errno;
use nix::kmod::{finit_module, ModuleInitFlags};

const ORDER_FILE: &str = "/vmette/modules";
const NETWORK_ORDER_FILE: &str = "/vmette/modules.net";
const MODULE_DIR: &str = "/lib/modules";

/// Loads the modules every guest needs.
pub fn load_listed() -> io::Result<()> {
    load_order(ORDER_FILE)
}

/// Loads the network device's driver; only from the initramfs, so before
/// the root is switched.
pub fn load_network() -> io::Result<()> {
    load_order(NETWORK_ORDER_FILE)
}

fn load_order(file: &str) -> io::Result<()> {
    let order = match std::fs::read_to_string(file) {
        Ok(order) => order,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let no_params = CString::default();
    for name in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = Path::new(MODULE_DIR).join(name);
        let file = File::open(&path)?;
        match finit_module(&file, &no_params, ModuleInitFlags::empty()) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(errno) => {
                return Err(io::Error::other(format!(
                    "loading {name} failed: {}",
                    errno.desc()
                )))
            }
        }
    }
    Ok(())
}
