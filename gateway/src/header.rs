//! The framing at the start of each QUIC stream between gateways: a 2-byte big-endian length,
//! then a protobuf message ([`StreamHeader`] one way, [`StreamReply`] back). After the reply,
//! the stream carries the tunnelled bytes untouched.

pub use isthmus_proto::tunnel::{StreamHeader, StreamReply};
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest header accepted; anything longer is an error, not an allocation.
pub const MAX_HEADER: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("stream i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("header of {0} bytes exceeds the limit of {MAX_HEADER}")]
    TooLarge(usize),
    #[error("header does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
}

pub async fn write<M: Message, W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &M,
) -> Result<(), FrameError> {
    let len = msg.encoded_len();
    if len > MAX_HEADER {
        return Err(FrameError::TooLarge(len));
    }
    let mut buf = Vec::with_capacity(2 + len);
    buf.extend_from_slice(&(len as u16).to_be_bytes());
    msg.encode(&mut buf).expect("vec grows");
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

pub async fn read<M: Message + Default, R: AsyncRead + Unpin>(r: &mut R) -> Result<M, FrameError> {
    let mut len = [0u8; 2];
    r.read_exact(&mut len).await?;
    let len = usize::from(u16::from_be_bytes(len));
    if len > MAX_HEADER {
        return Err(FrameError::TooLarge(len));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    Ok(M::decode(buf.as_slice())?)
}

pub async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<StreamHeader, FrameError> {
    read(r).await
}

pub async fn read_reply<R: AsyncRead + Unpin>(r: &mut R) -> Result<StreamReply, FrameError> {
    read(r).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn headers_round_trip_and_oversized_ones_are_refused() {
        let h = StreamHeader {
            target_cluster: "west".into(),
            service: "echo".into(),
            port: 80,
            ..Default::default()
        };
        let mut buf = Vec::new();
        write(&mut buf, &h).await.expect("write");
        let back = read_header(&mut buf.as_slice()).await.expect("read");
        assert_eq!(back, h);
        let bogus = [0xffu8, 0xff, 0, 0];
        assert!(matches!(
            read_header(&mut bogus.as_slice()).await,
            Err(FrameError::TooLarge(_))
        ));
        let garbage = [0u8, 3, 0xff, 0xff, 0xff];
        assert!(matches!(
            read_header(&mut garbage.as_slice()).await,
            Err(FrameError::Decode(_))
        ));
    }
}
