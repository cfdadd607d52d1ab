//! Length-prefixed frames carrying postcard-encoded messages.

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Largest frame body accepted or produced, in bytes. Output chunks are at
/// most [`crate::MAX_CHUNK_LEN`], so real frames stay far below this.
pub const MAX_FRAME_LEN: usize = 1 << 20;

/// Bytes of the length prefix in front of every frame body.
pub const FRAME_HEADER_LEN: usize = 4;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The underlying stream failed.
    #[error("control channel I/O failed")]
    Io(#[source] io::Error),
    /// The stream ended in the middle of a frame.
    #[error("control channel closed in the middle of a frame")]
    Truncated,
    /// The length prefix exceeds [`MAX_FRAME_LEN`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_LEN}-byte limit")]
    TooLarge(usize),
    /// The body is not a valid encoding of the expected message type.
    #[error("malformed frame body")]
    Malformed(#[source] postcard::Error),
}

impl FrameError {
    /// True when the peer is gone or cannot be trusted to continue: the
    /// stream is desynchronised after any of these, so the caller must close
    /// the channel rather than read on.
    pub fn is_fatal(&self) -> bool {
        match self {
            FrameError::Io(_)
            | FrameError::Truncated
            | FrameError::TooLarge(_)
            | FrameError::Malformed(_) => true,
        }
    }
}

/// Writes `message` as one frame. The frame is assembled in memory first so
/// that concurrent writers holding a lock never interleave partial frames.
pub fn write_frame<W: Write, T: Serialize>(writer: &mut W, message: &T) -> Result<(), FrameError> {
    let mut buf = vec![0u8; FRAME_HEADER_LEN];
    let mut buf =
        postcard::to_extend(message, std::mem::take(&mut buf)).map_err(FrameError::Malformed)?;
    let body_len = buf.len() - FRAME_HEADER_LEN;
    if body_len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(body_len));
    }
    let prefix = u32::try_from(body_len).map_err(|_| FrameError::TooLarge(body_len))?;
    buf[..FRAME_HEADER_LEN].copy_from_slice(&prefix.to_le_bytes());
    writer.write_all(&buf).map_err(FrameError::Io)?;
    writer.flush().map_err(FrameError::Io)
}

/// Reads one frame. Returns `Ok(None)` on a clean end of stream (before the
/// first byte of a frame), `Err(Truncated)` when the stream ends inside one.
pub fn read_frame<R: Read, T: DeserializeOwned>(reader: &mut R) -> Result<Option<T>, FrameError> {
    let mut prefix = [0u8; FRAME_HEADER_LEN];
    match read_full(reader, &mut prefix)? {
        0 => return Ok(None),
        n if n < FRAME_HEADER_LEN => return Err(FrameError::Truncated),
        _ => {}
    }
    let body_len = u32::from_le_bytes(prefix) as usize;
    if body_len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(body_len));
    }
    let mut body = vec![0u8; body_len];
    if read_full(reader, &mut body)? < body_len {
        return Err(FrameError::Truncated);
    }
    let (message, rest) = postcard::take_from_bytes(&body).map_err(FrameError::Malformed)?;
    if !rest.is_empty() {
        return Err(FrameError::Malformed(
            postcard::Error::DeserializeBadEncoding,
        ));
    }
    Ok(Some(message))
}

/// Fills `buf` unless the stream ends first; returns how many bytes were read.
fn read_full<R: Read>(reader: &mut R, buf: &mut [u8]) -> Result<usize, FrameError> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ExitStatus, GuestMessage, HostMessage};
    use std::io::Cursor;

    fn encode<T: Serialize>(message: &T) -> Vec<u8> {
        let mut out = Vec::new();
        write_frame(&mut out, message).expect("encode");
        out
    }

    #[test]
    fn round_trips_a_sequence_of_frames() {
        let mut wire = encode(&GuestMessage::Stdout {
            id: 3,
            data: b"hello".to_vec(),
        });
        wire.extend(encode(&GuestMessage::Exited {
            id: 3,
            status: ExitStatus::Code(7),
        }));
        let mut cursor = Cursor::new(wire);
        let first: GuestMessage = read_frame(&mut cursor).expect("read").expect("frame");
        assert_eq!(
            first,
            GuestMessage::Stdout {
                id: 3,
                data: b"hello".to_vec()
            }
        );
        let second: GuestMessage = read_frame(&mut cursor).expect("read").expect("frame");
        assert_eq!(
            second,
            GuestMessage::Exited {
                id: 3,
                status: ExitStatus::Code(7)
            }
        );
        let end: Option<GuestMessage> = read_frame(&mut cursor).expect("clean end");
        assert!(end.is_none());
    }

    #[test]
    fn rejects_oversized_length_before_allocating() {
        let mut wire = ((MAX_FRAME_LEN + 1) as u32).to_le_bytes().to_vec();
        wire.extend([0u8; 8]);
        let result: Result<Option<HostMessage>, _> = read_frame(&mut Cursor::new(wire));
        assert!(matches!(result, Err(FrameError::TooLarge(n)) if n == MAX_FRAME_LEN + 1));
    }

    #[test]
    fn rejects_maximum_u32_length() {
        let wire = u32::MAX.to_le_bytes().to_vec();
        let result: Result<Option<HostMessage>, _> = read_frame(&mut Cursor::new(wire));
        assert!(matches!(result, Err(FrameError::TooLarge(_))));
    }

    #[test]
    fn reports_truncated_prefix_and_body() {
        let result: Result<Option<HostMessage>, _> = read_frame(&mut Cursor::new(vec![5u8, 0]));
        assert!(matches!(result, Err(FrameError::Truncated)));

        let mut wire = encode(&HostMessage::PowerOff);
        wire.extend(10u32.to_le_bytes());
        wire.extend([1u8, 2, 3]);
        let mut cursor = Cursor::new(wire);
        let _: HostMessage = read_frame(&mut cursor).expect("first").expect("frame");
        let result: Result<Option<HostMessage>, _> = read_frame(&mut cursor);
        assert!(matches!(result, Err(FrameError::Truncated)));
    }

    #[test]
    fn rejects_garbage_and_trailing_bytes() {
        let mut wire = 3u32.to_le_bytes().to_vec();
        wire.extend([0xff, 0xff, 0xff]);
        let result: Result<Option<HostMessage>, _> = read_frame(&mut Cursor::new(wire));
        assert!(matches!(result, Err(FrameError::Malformed(_))));

        let body = postcard::to_stdvec(&HostMessage::PowerOff).expect("encode");
        let mut wire = ((body.len() + 1) as u32).to_le_bytes().to_vec();
        wire.extend(body);
        wire.push(0);
        let result: Result<Option<HostMessage>, _> = read_frame(&mut Cursor::new(wire));
        assert!(matches!(result, Err(FrameError::Malformed(_))));
    }

    #[test]
    fn rejects_empty_body() {
        let wire = 0u32.to_le_bytes().to_vec();
        let result: Result<Option<HostMessage>, _> = read_frame(&mut Cursor::new(wire));
        assert!(matches!(result, Err(FrameError::Malformed(_))));
    }

    #[test]
    fn refuses_to_write_oversized_frames() {
        let message = GuestMessage::Stdout {
            id: 1,
            data: vec![0u8; MAX_FRAME_LEN + 1],
        };
        let mut out = Vec::new();
        assert!(matches!(
            write_frame(&mut out, &message),
            Err(FrameError::TooLarge(_))
        ));
        assert!(out.is_empty());
    }

    /// Property: whatever bytes arrive, the reader returns (a message, an
    /// end, or an error) without panicking, and never reads a frame whose
    /// declared length exceeds the limit. Inputs come from a fixed-seed
    /// generator, so failures reproduce.
    #[test]
    fn random_and_mutated_input_never_panics() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let valid = encode(&GuestMessage::Exited {
            id: 9,
            status: ExitStatus::Signal(15),
        });
        for round in 0..20_000 {
            let mut bytes = if round % 2 == 0 {
                valid.clone()
            } else {
                let len = (next() % 64) as usize;
                (0..len).map(|_| next() as u8).collect()
            };
            if !bytes.is_empty() {
                for _ in 0..(next() % 4) {
                    let at = (next() as usize) % bytes.len();
                    bytes[at] = next() as u8;
                }
            }
            let mut cursor = Cursor::new(bytes);
            for _ in 0..4 {
                match read_frame::<_, GuestMessage>(&mut cursor) {
                    Ok(Some(message)) => {
                        let _ = message.validate();
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            let mut cursor = Cursor::new(cursor.into_inner());
            let _ = read_frame::<_, HostMessage>(&mut cursor);
        }
    }
}
