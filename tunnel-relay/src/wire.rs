//! The relay protocol over tokio streams: the codec is [`weft_proto::relay`]
//! (re-exported here, so `wire::Message` is the relay message), the mesh
//! control codec [`weft_proto::control`]; this module only moves frames.
//!
//! Every frame is a 4-byte big-endian length and its payload, at most the
//! protocol's limit ([`MAX_FRAME`] for relay messages, the caller's limit up
//! to [`weft_proto::control::MAX_CONTROL_FRAME`] for control frames). A reader reads exactly one
//! frame and nothing after it (tunnel streams carry raw bytes next), and
//! checks the announced length before allocating.

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub use weft_proto::relay::*;

use weft_proto::codec::{self, DecodeError, FrameLimit, Wire as _};
use weft_proto::control::{ControlMsg, CONTROL_FRAME};

/// An I/O or codec failure while reading or writing frames (relay or control).
#[derive(Debug, Error)]
pub enum FrameError {
    /// The stream failed or ended inside a frame.
    #[error("stream: {0}")]
    Io(#[from] std::io::Error),
    /// The bytes were not a valid frame/message (or over the size limit).
    #[error("protocol: {0}")]
    Wire(#[from] DecodeError),
    /// The stream ended cleanly before a frame began.
    #[error("stream ended before the expected message")]
    Eof,
}

/// Reading or writing one control frame failed: the same failures as relay frames.
pub type ControlIoError = FrameError;

/// Reads exactly one frame's payload (at most `limit.max` bytes), nothing after it.
async fn read_frame_within<R: AsyncRead + Unpin>(
    r: &mut R,
    limit: FrameLimit,
) -> Result<Vec<u8>, FrameError> {
    let mut head = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut head[got..]).await?;
        if n == 0 {
            return Err(if got == 0 {
                FrameError::Eof
            } else {
                FrameError::Io(std::io::ErrorKind::UnexpectedEof.into())
            });
        }
        got += n;
    }
    let len = codec::frame_len(head, limit.max).map_err(|o| o.as_decode(limit.what))?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok(payload)
}

/// Reads one frame's payload; reads exactly the frame, nothing after it.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Vec<u8>, FrameError> {
    read_frame_within(r, FRAME).await
}

/// Writes one frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    payload: &[u8],
) -> Result<(), FrameError> {
    let frame = encode_frame(payload)?;
    w.write_all(&frame).await?;
    Ok(())
}

/// Reads one frame and decodes it as a message.
pub async fn read_message<R: AsyncRead + Unpin>(r: &mut R) -> Result<Message, FrameError> {
    let payload = read_frame(r).await?;
    Ok(Message::decode(&payload)?)
}

/// Encodes and writes one message as a frame.
pub async fn write_message<W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &Message,
) -> Result<(), FrameError> {
    write_frame(w, &msg.encode()).await
}

/// Reads one control frame of at most `max` payload bytes and decodes it.
pub async fn read_control<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<ControlMsg, ControlIoError> {
    let limit = FrameLimit {
        max: max.min(CONTROL_FRAME.max),
        ..CONTROL_FRAME
    };
    let payload = read_frame_within(r, limit).await?;
    Ok(ControlMsg::decode(&payload)?)
}

/// Encodes and writes one control frame (this build's newest peer codec).
pub async fn write_control<W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &ControlMsg,
) -> Result<(), ControlIoError> {
    write_control_at(w, msg, weft_proto::control::PEER_CODEC).await
}

/// Encodes one control frame in peer codec `codec` (what the node at the
/// other end reads, from its `MeshJoin`) and writes it.
pub async fn write_control_at<W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &ControlMsg,
    codec: u8,
) -> Result<(), ControlIoError> {
    let frame = msg.encode_frame_at(codec)?;
    w.write_all(&frame).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proto::control::ControlWireError;
    use weft_proto::peermap::Version;

    #[tokio::test]
    async fn frames_over_the_reader_limit_are_refused() {
        let mut buf = Vec::new();
        let m = ControlMsg::EndpointReport(vec![]);
        assert!(write_control(&mut buf, &m).await.is_ok());
        assert!(
            write_control(&mut buf, &ControlMsg::Ack(Version::default()))
                .await
                .is_ok()
        );
        let mut cur = std::io::Cursor::new(buf.clone());
        assert!(matches!(read_control(&mut cur, 64).await, Ok(x) if x == m));
        assert!(matches!(
            read_control(&mut cur, 64).await,
            Ok(ControlMsg::Ack(_))
        ));
        assert!(matches!(
            read_control(&mut cur, 64).await,
            Err(ControlIoError::Eof)
        ));
        let mut cur = std::io::Cursor::new(buf);
        assert!(matches!(
            read_control(&mut cur, 1).await,
            Err(ControlIoError::Wire(ControlWireError::TooLong { .. }))
        ));
    }

    #[tokio::test]
    async fn async_frames_read_exactly_one_message() {
        let mut buf = Vec::new();
        write_message(&mut buf, &Message::OpenOk).await.ok();
        buf.extend_from_slice(b"raw bytes");
        let mut cur = std::io::Cursor::new(buf);
        let m = read_message(&mut cur).await;
        assert!(matches!(m, Ok(Message::OpenOk)));
        let mut rest = Vec::new();
        cur.read_to_end(&mut rest).await.ok();
        assert_eq!(rest, b"raw bytes");
    }
}
