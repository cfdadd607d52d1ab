//! The host terminal of `vmette run -t` and `vmette shell`: raw mode while
//! the guest's PTY owns the keyboard, restored on every way out, and the
//! window size, sent on as it changes.

use std::io::IsTerminal;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::mpsc::{self, Receiver};

use anyhow::{bail, Context};
use nix::sys::termios::{self, SetArg, Termios};
use signal_hook::consts::SIGWINCH;
use signal_hook::iterator::Signals;
use vmette::PtySize;

/// The size a terminal that cannot tell gets.
const FALLBACK: PtySize = PtySize { rows: 24, cols: 80 };

/// Puts stdin's terminal into raw mode, so every key (Ctrl-C and Ctrl-\
/// too) goes to the guest as a byte, and restores the saved mode on drop.
pub struct RawMode {
    saved: Termios,
}

impl RawMode {
    pub fn enter() -> anyhow::Result<RawMode> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            bail!("-t needs a terminal on stdin; without one, drop -t and pipe the input");
        }
        let saved = termios::tcgetattr(stdin.as_fd()).context("cannot read the terminal's mode")?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw)
            .context("cannot put the terminal into raw mode")?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // TCSADRAIN: what the guest wrote last reaches the screen in the
        // mode it was written for.
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSADRAIN, &self.saved);
    }
}

/// The size of the terminal on stdout (or stdin).
pub fn size() -> PtySize {
    for fd in [std::io::stdout().as_raw_fd(), std::io::stdin().as_raw_fd()] {
        let mut window = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one winsize through the pointer, which
        // points to a live local for the duration of the call.
        let ok = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut window) } == 0;
        if ok && window.ws_row > 0 && window.ws_col > 0 {
            return PtySize {
                rows: window.ws_row.min(vmette::MAX_PTY_SIDE),
                cols: window.ws_col.min(vmette::MAX_PTY_SIDE),
            };
        }
    }
    FALLBACK
}

/// Sends the terminal's new size each time it changes (SIGWINCH).
pub fn watch_size() -> anyhow::Result<Receiver<PtySize>> {
    let (sizes, changes) = mpsc::channel();
    let mut signals = Signals::new([SIGWINCH]).context("cannot watch the terminal's size")?;
    std::thread::Builder::new()
        .name("winch".into())
        .spawn(move || {
            for _ in signals.forever() {
                if sizes.send(size()).is_err() {
                    return;
                }
            }
        })
        .context("cannot start the terminal-size thread")?;
    Ok(changes)
}
