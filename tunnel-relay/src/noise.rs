//! Noise IK (`Noise_IK_25519_ChaChaPoly_BLAKE2s`) on the first bidirectional
//! stream of a QUIC connection. The prologue is a protocol label followed by
//! a 32-byte TLS exporter value of this QUIC connection, so a handshake (and
//! everything later on the connection) cannot be spliced into another
//! connection: a man in the middle terminating TLS twice gets two different
//! exporter values and the Noise handshake fails.
//!
//! Message 1 (client → relay) carries [`Message::Hello`]; message 2 (relay →
//! client) carries [`Message::Accepted`] or [`Message::Rejected`].

use crate::transport::{Connection, RecvStream, SendStream};

use crate::error::ProtoError;
use crate::keys::{PublicKey, StaticKey};
use crate::wire::{read_frame, write_frame, Message, MAX_FRAME};
use weft_proto::codec::Wire as _;

/// The Noise pattern.
pub const NOISE_PARAMS: &str = "Noise_IK_25519_ChaChaPoly_BLAKE2s";
const PROLOGUE_LABEL: &[u8] = b"weft-tunnel-relay/1 noise prologue";
/// Largest IK handshake overhead (ephemeral + encrypted static + two tags).
const NOISE_OVERHEAD: usize = 32 + 48 + 16 + 16;

/// The prologue for this connection: label || TLS exporter(32).
pub fn prologue(conn: &Connection) -> Result<Vec<u8>, ProtoError> {
    let ekm = conn.exporter().ok_or(ProtoError::Exporter)?;
    let mut p = PROLOGUE_LABEL.to_vec();
    p.extend_from_slice(&ekm);
    Ok(p)
}

fn builder(prologue: &[u8]) -> Result<snow::Builder<'_>, ProtoError> {
    let params = NOISE_PARAMS.parse().map_err(ProtoError::Noise)?;
    Ok(snow::Builder::new(params).prologue(prologue))
}

/// Client side: sends `hello` to the relay whose key is `relay`, returns the
/// relay's answer (Accepted or Rejected).
pub async fn initiate(
    key: &StaticKey,
    relay: &PublicKey,
    prologue: &[u8],
    send: &mut SendStream,
    recv: &mut RecvStream,
    hello: &Message,
) -> Result<Message, ProtoError> {
    let mut hs = builder(prologue)?
        .local_private_key(key.private_bytes())
        .remote_public_key(&relay.0)
        .build_initiator()?;
    let payload = hello.encode();
    let mut buf = vec![0u8; (payload.len() + NOISE_OVERHEAD).min(MAX_FRAME)];
    let n = hs.write_message(&payload, &mut buf)?;
    write_frame(send, &buf[..n]).await?;
    let msg2 = read_frame(recv).await?;
    let mut buf = vec![0u8; msg2.len()];
    let n = hs.read_message(&msg2, &mut buf)?;
    Ok(Message::decode(&buf[..n]).map_err(crate::wire::FrameError::from)?)
}

/// Relay side, step 1: reads message 1; returns the client's static key,
/// its hello, and the state needed to answer.
pub async fn respond_read(
    key: &StaticKey,
    prologue: &[u8],
    recv: &mut RecvStream,
) -> Result<(PublicKey, Message, snow::HandshakeState), ProtoError> {
    let mut hs = builder(prologue)?
        .local_private_key(key.private_bytes())
        .build_responder()?;
    let msg1 = read_frame(recv).await?;
    let mut buf = vec![0u8; msg1.len()];
    let n = hs.read_message(&msg1, &mut buf)?;
    let hello = Message::decode(&buf[..n]).map_err(crate::wire::FrameError::from)?;
    let remote = hs
        .get_remote_static()
        .and_then(PublicKey::from_slice)
        .ok_or_else(|| ProtoError::Unexpected("no static key in IK message 1".into()))?;
    Ok((remote, hello, hs))
}

/// Relay side, step 2: sends the answer in message 2.
pub async fn respond_write(
    mut hs: snow::HandshakeState,
    send: &mut SendStream,
    answer: &Message,
) -> Result<(), ProtoError> {
    let payload = answer.encode();
    let mut buf = vec![0u8; (payload.len() + NOISE_OVERHEAD).min(MAX_FRAME)];
    let n = hs.write_message(&payload, &mut buf)?;
    write_frame(send, &buf[..n]).await?;
    Ok(())
}
