//! A [`VZVirtualMachineConfiguration`] built from a [`DevicePlan`].

use std::os::fd::{IntoRawFd, OwnedFd};
use std::path::Path;

use objc2::rc::Retained;
use objc2::{AllocAnyThread, ClassType};
use objc2_foundation::{NSArray, NSError, NSFileHandle, NSString, NSURL};
use objc2_virtualization::{
    VZDirectorySharingDeviceConfiguration, VZDiskImageStorageDeviceAttachment,
    VZEntropyDeviceConfiguration, VZFileHandleNetworkDeviceAttachment,
    VZFileHandleSerialPortAttachment, VZLinuxBootLoader, VZMACAddress,
    VZMemoryBalloonDeviceConfiguration, VZNetworkDeviceConfiguration, VZSerialPortConfiguration,
    VZSharedDirectory, VZSingleDirectoryShare, VZSocketDeviceConfiguration,
    VZStorageDeviceConfiguration, VZVirtioBlockDeviceConfiguration,
    VZVirtioConsoleDeviceSerialPortConfiguration, VZVirtioEntropyDeviceConfiguration,
    VZVirtioFileSystemDeviceConfiguration, VZVirtioNetworkDeviceConfiguration,
    VZVirtioSocketDeviceConfiguration, VZVirtioTraditionalMemoryBalloonDeviceConfiguration,
    VZVirtualMachineConfiguration,
};
use vmette_core::engine::EngineError;

use crate::plan::DevicePlan;

fn url(path: &Path) -> Retained<NSURL> {
    NSURL::fileURLWithPath(&NSString::from_str(&path.to_string_lossy()))
}

/// The framework's description of an error, as one line.
pub(crate) fn describe(error: &NSError) -> String {
    error.localizedDescription().to_string()
}

fn framework_error(what: &str, error: &NSError) -> EngineError {
    EngineError::Unsupported(format!("{what}: {}", describe(error)))
}

/// Builds and validates the configuration for `plan`. The guest console
/// writes into `console`, the write end of a pipe whose read end the
/// engine drains into a bounded buffer.
pub fn build(
    plan: &DevicePlan,
    console: OwnedFd,
) -> Result<Retained<VZVirtualMachineConfiguration>, EngineError> {
    // SAFETY: every object is created and configured on this thread before
    // any VM exists; configuration objects have no queue affinity, and every
    // argument is a live object of the type the framework expects.
    unsafe {
        let configuration = VZVirtualMachineConfiguration::new();

        let boot_loader =
            VZLinuxBootLoader::initWithKernelURL(VZLinuxBootLoader::alloc(), &url(&plan.kernel));
        boot_loader.setInitialRamdiskURL(Some(&url(&plan.initramfs)));
        boot_loader.setCommandLine(&NSString::from_str(&plan.cmdline));
        configuration.setBootLoader(Some(boot_loader.as_super()));
        configuration.setCPUCount(plan.cpus);
        configuration.setMemorySize(plan.memory_bytes);

        let mut storage: Vec<Retained<VZStorageDeviceConfiguration>> = Vec::new();
        for disk in &plan.disks {
            let attachment = VZDiskImageStorageDeviceAttachment::initWithURL_readOnly_error(
                VZDiskImageStorageDeviceAttachment::alloc(),
                &url(&disk.path),
                disk.read_only,
            )
            .map_err(|e| framework_error(&format!("cannot attach {}", disk.path.display()), &e))?;
            let device = VZVirtioBlockDeviceConfiguration::initWithAttachment(
                VZVirtioBlockDeviceConfiguration::alloc(),
                attachment.as_super(),
            );
            device.setBlockDeviceIdentifier(&NSString::from_str(&disk.identifier));
            storage.push(Retained::into_super(device));
        }
        configuration.setStorageDevices(&NSArray::from_retained_slice(&storage));

        let mut shares: Vec<Retained<VZDirectorySharingDeviceConfiguration>> = Vec::new();
        for share in &plan.shares {
            let directory = VZSharedDirectory::initWithURL_readOnly(
                VZSharedDirectory::alloc(),
                &url(&share.path),
                share.read_only,
            );
            let single = VZSingleDirectoryShare::initWithDirectory(
                VZSingleDirectoryShare::alloc(),
                &directory,
            );
            let device = VZVirtioFileSystemDeviceConfiguration::initWithTag(
                VZVirtioFileSystemDeviceConfiguration::alloc(),
                &NSString::from_str(&share.tag),
            );
            device.setShare(Some(single.as_super()));
            shares.push(Retained::into_super(device));
        }
        configuration.setDirectorySharingDevices(&NSArray::from_retained_slice(&shares));

        if let Some(network) = &plan.network {
            // The handle owns a duplicate; the plan keeps its own descriptor.
            let fd = network
                .frames
                .0
                .try_clone()
                .map_err(|source| EngineError::Io {
                    context: "cannot hand the network socket to the framework".into(),
                    source,
                })?;
            let handle = NSFileHandle::initWithFileDescriptor_closeOnDealloc(
                NSFileHandle::alloc(),
                fd.into_raw_fd(),
                true,
            );
            let attachment = VZFileHandleNetworkDeviceAttachment::initWithFileHandle(
                VZFileHandleNetworkDeviceAttachment::alloc(),
                &handle,
            );
            attachment.setMaximumTransmissionUnit(network.mtu.try_into().unwrap_or(1500));
            let device = VZVirtioNetworkDeviceConfiguration::new();
            device.setAttachment(Some(attachment.as_super()));
            let mac = VZMACAddress::initWithString(
                VZMACAddress::alloc(),
                &NSString::from_str(&network.mac),
            )
            .ok_or_else(|| EngineError::InvalidConfig {
                field: "network",
                reason: format!("{} is not a MAC address", network.mac),
            })?;
            device.setMACAddress(&mac);
            let devices: [Retained<VZNetworkDeviceConfiguration>; 1] =
                [Retained::into_super(device)];
            configuration.setNetworkDevices(&NSArray::from_retained_slice(&devices));
        }

        if plan.console {
            let handle = NSFileHandle::initWithFileDescriptor_closeOnDealloc(
                NSFileHandle::alloc(),
                console.into_raw_fd(),
                true,
            );
            let attachment =
                VZFileHandleSerialPortAttachment::initWithFileHandleForReading_fileHandleForWriting(
                    VZFileHandleSerialPortAttachment::alloc(),
                    None,
                    Some(&handle),
                );
            let port = VZVirtioConsoleDeviceSerialPortConfiguration::new();
            port.setAttachment(Some(attachment.as_super()));
            let ports: [Retained<VZSerialPortConfiguration>; 1] = [Retained::into_super(port)];
            configuration.setSerialPorts(&NSArray::from_retained_slice(&ports));
        }

        if plan.entropy {
            let entropy: [Retained<VZEntropyDeviceConfiguration>; 1] = [Retained::into_super(
                VZVirtioEntropyDeviceConfiguration::new(),
            )];
            configuration.setEntropyDevices(&NSArray::from_retained_slice(&entropy));
        }
        if plan.memory_balloon {
            let balloon: [Retained<VZMemoryBalloonDeviceConfiguration>; 1] =
                [Retained::into_super(
                    VZVirtioTraditionalMemoryBalloonDeviceConfiguration::new(),
                )];
            configuration.setMemoryBalloonDevices(&NSArray::from_retained_slice(&balloon));
        }
        let sockets: [Retained<VZSocketDeviceConfiguration>; 1] = [Retained::into_super(
            VZVirtioSocketDeviceConfiguration::new(),
        )];
        configuration.setSocketDevices(&NSArray::from_retained_slice(&sockets));

        configuration
            .validateWithError()
            .map_err(|e| framework_error("the VM configuration is not valid", &e))?;
        Ok(configuration)
    }
}
