//! Running the host tools that assets come from (apt, dpkg-deb, mmdebstrap,
//! mkfs.erofs), with failures turned into [`AssetError`]s that say which
//! tool failed and what it printed.

use std::process::{Command, Output, Stdio};

use crate::AssetError;

/// How much of a failed tool's output is kept for the error message.
const OUTPUT_TAIL: usize = 2000;

/// A command for the host tool `name`, found with [`crate::host_tool::locate`]
/// so that `sbin` tools work for ordinary users too.
pub fn tool(name: &str) -> Command {
    Command::new(crate::host_tool::locate(name).unwrap_or_else(|| name.into()))
}

/// Runs `command` to completion, capturing its output.
pub fn run(command: &mut Command) -> Result<Output, AssetError> {
    let tool = command.get_program().to_string_lossy().into_owned();
    tracing::debug!(?command, "running");
    let output =
        command
            .stdin(Stdio::null())
            .output()
            .map_err(|source| AssetError::ToolMissing {
                tool: tool.clone(),
                source,
            })?;
    if !output.status.success() {
        let mut text = String::from_utf8_lossy(&output.stderr).into_owned();
        if text.trim().is_empty() {
            text = String::from_utf8_lossy(&output.stdout).into_owned();
        }
        let start = text.len().saturating_sub(OUTPUT_TAIL);
        let start = (start..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(text.len());
        return Err(AssetError::ToolFailed {
            tool,
            status: output.status,
            output: text[start..].trim().to_string(),
        });
    }
    Ok(output)
}
