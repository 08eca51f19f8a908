//! The gRPC contract between `ddisco-controller` and `ddisco-agent`.
//!
//! Generated types stay at the edges: the controller and the agent convert
//! them into their own domain types right after receiving them.
//! Use it as `use ddisco_proto::v1 as api;`.

/// The codec of every service: prost's, with 1 KiB initial buffers instead
/// of 8 KiB. Each agent session holds an encode and a decode buffer for as
/// long as it lives, and its messages are a few dozen bytes (heartbeats);
/// a large message (a status reply) still grows its buffer as it needs.
pub mod codec {
    use std::marker::PhantomData;
    use tonic::codec::{BufferSettings, Codec};
    use tonic_prost::{ProstDecoder, ProstEncoder};

    /// Initial encode/decode buffer per call.
    pub const BUFFER_BYTES: usize = 1024;
    /// tonic's default: yield to the runtime after this many bytes.
    const YIELD_BYTES: usize = 32 * 1024;

    #[derive(Debug, Clone)]
    pub struct SmallCodec<T, U>(PhantomData<(T, U)>);

    impl<T, U> Default for SmallCodec<T, U> {
        fn default() -> Self {
            SmallCodec(PhantomData)
        }
    }

    impl<T, U> Codec for SmallCodec<T, U>
    where
        T: prost::Message + Send + 'static,
        U: prost::Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = ProstEncoder<T>;
        type Decoder = ProstDecoder<U>;

        fn encoder(&mut self) -> Self::Encoder {
            ProstEncoder::new(BufferSettings::new(BUFFER_BYTES, YIELD_BYTES))
        }

        fn decoder(&mut self) -> Self::Decoder {
            ProstDecoder::new(BufferSettings::new(BUFFER_BYTES, YIELD_BYTES))
        }
    }
}

/// `ddisco.v1`: enrollment, the agent session, and the local admin API.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("ddisco.v1");
}
