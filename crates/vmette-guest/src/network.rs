//! The guest's interfaces: `lo` always, and the one network device when
//! the host gives the guest a network, configured statically from the boot
//! envelope with the classic interface and route ioctls (no DHCP client,
//! no netlink library, nothing the image must provide). IPv6 is turned
//! off first, so the interface never gets a link-local address: the host's
//! stack speaks IPv4 alone.

use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use vmette_proto::GuestNetwork;

/// How long the network device may take to appear after its driver loads.
const DEVICE_WAIT: Duration = Duration::from_secs(5);

/// Where the guest's resolver configuration is written.
const RESOLV_CONF: &str = "/etc/resolv.conf";

/// A socket for interface ioctls.
fn control_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket() has no memory-safety preconditions; the result is
    // checked before it is owned.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a freshly opened descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An interface request naming `name`, all else zero.
fn request(name: &str) -> io::Result<libc::ifreq> {
    if name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::other(format!(
            "interface name {name} is too long"
        )));
    }
    // SAFETY: ifreq is plain old data for which all-zero is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    Ok(request)
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr {
    let inet = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are the same size, and every bit
    // pattern is a valid sockaddr.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(inet) }
}

/// Runs one interface ioctl, naming it in the error.
///
/// # Safety
///
/// `argument` must be the structure `op` reads or writes.
unsafe fn ioctl<T>(
    fd: &OwnedFd,
    op: libc::c_ulong,
    argument: &mut T,
    what: &str,
) -> io::Result<()> {
    // SAFETY: fd is open, and the caller promises argument is what op takes;
    // it outlives the call.
    let result = unsafe { libc::ioctl(fd.as_raw_fd(), op as libc::Ioctl, argument as *mut T) };
    if result < 0 {
        let error = io::Error::last_os_error();
        return Err(io::Error::new(error.kind(), format!("{what}: {error}")));
    }
    Ok(())
}

/// Sets interface `name` up.
fn set_up(fd: &OwnedFd, name: &str) -> io::Result<()> {
    let mut request = request(name)?;
    // SAFETY: SIOCGIFFLAGS and SIOCSIFFLAGS take an ifreq and use its flags
    // field.
    unsafe {
        ioctl(fd, libc::SIOCGIFFLAGS, &mut request, "reading the flags")?;
        request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        ioctl(
            fd,
            libc::SIOCSIFFLAGS,
            &mut request,
            "setting the interface up",
        )
    }
}

/// Sets `lo` up so that programs binding to localhost work. Best effort:
/// a guest without it still runs commands.
pub fn bring_up_loopback() {
    if let Err(e) = control_socket().and_then(|fd| set_up(&fd, "lo")) {
        eprintln!("vmette-guest: lo stays down: {e}");
    }
}

/// Configures the network device the host gave the guest, and the
/// resolver. `writable_root` says the root is the user's own directory,
/// whose `/etc/resolv.conf` is covered rather than replaced.
pub fn configure(network: &GuestNetwork, writable_root: bool) -> io::Result<()> {
    for scope in ["all", "default"] {
        let path = format!("/proc/sys/net/ipv6/conf/{scope}/disable_ipv6");
        // A kernel without IPv6 has nothing to turn off.
        if Path::new(&path).exists() {
            fs::write(&path, "1")?;
        }
    }
    let name = find_interface(&network.mac)?;
    let fd = control_socket()?;
    let mut mtu = request(&name)?;
    mtu.ifr_ifru.ifru_mtu = libc::c_int::from(network.mtu);
    let mut address = request(&name)?;
    address.ifr_ifru.ifru_addr = sockaddr(network.address);
    let mask = u32::MAX << (32 - u32::from(network.prefix_len));
    let mut netmask = request(&name)?;
    netmask.ifr_ifru.ifru_netmask = sockaddr(Ipv4Addr::from(mask));
    // SAFETY: each request is an ifreq with the field its ioctl reads set.
    unsafe {
        ioctl(&fd, libc::SIOCSIFMTU, &mut mtu, "setting the MTU")?;
        ioctl(&fd, libc::SIOCSIFADDR, &mut address, "setting the address")?;
        ioctl(
            &fd,
            libc::SIOCSIFNETMASK,
            &mut netmask,
            "setting the netmask",
        )?;
    }
    set_up(&fd, &name)?;

    // SAFETY: rtentry is plain old data for which all-zero is a valid value.
    let mut route: libc::rtentry = unsafe { std::mem::zeroed() };
    route.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
    route.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
    route.rt_gateway = sockaddr(network.gateway);
    route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    // SAFETY: SIOCADDRT takes an rtentry; rt_dev stays null (any device).
    unsafe { ioctl(&fd, libc::SIOCADDRT, &mut route, "adding the default route")? };

    write_resolv_conf(network.nameserver, writable_root)
}

/// The name of the interface with hardware address `mac`, waiting for its
/// driver to bring it up.
fn find_interface(mac: &[u8; 6]) -> io::Result<String> {
    let wanted = mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    let deadline = Instant::now() + DEVICE_WAIT;
    loop {
        for entry in fs::read_dir("/sys/class/net")?.flatten() {
            let address = fs::read_to_string(entry.path().join("address")).unwrap_or_default();
            if address.trim() == wanted {
                return Ok(entry.file_name().to_string_lossy().into_owned());
            }
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no network interface with address {wanted}"),
            ));
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Points the resolver at `nameserver`. In a throwaway overlay the file is
/// replaced (it may be a link into a resolver daemon's directory); over
/// the user's own writable root a file in `/run` is mounted on top, so
/// nothing of theirs changes.
fn write_resolv_conf(nameserver: Ipv4Addr, writable_root: bool) -> io::Result<()> {
    let text = format!("nameserver {nameserver}\noptions edns0\n");
    if !writable_root {
        match fs::remove_file(RESOLV_CONF) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        fs::create_dir_all("/etc")?;
        return fs::write(RESOLV_CONF, text);
    }
    let covering = "/run/vmette-resolv.conf";
    fs::write(covering, text)?;
    if !fs::symlink_metadata(RESOLV_CONF).is_ok_and(|m| m.is_file()) {
        eprintln!("vmette-guest: {RESOLV_CONF} is not a file in the shared root; names resolve only if it names {nameserver}");
        return Ok(());
    }
    nix::mount::mount(
        Some(covering),
        RESOLV_CONF,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| io::Error::other(format!("covering {RESOLV_CONF}: {e}")))
}
