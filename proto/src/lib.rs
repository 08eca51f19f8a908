//! The gRPC contract between `ddisco-controller` and `ddisco-agent`.
//!
//! Generated types stay at the edges: the controller and the agent convert
//! them into their own domain types right after receiving them.
//! Use it as `use ddisco_proto::v1 as api;`.

/// `ddisco.v1`: enrollment, the agent session, and the local admin API.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("ddisco.v1");
}
