//! The Otherix API contract: types, clients and servers generated from `proto/`,
//! and the encoded descriptor set that the gateway, the authorizer and gRPC
//! reflection read the custom options from.

#![allow(clippy::all, missing_docs)]

/// Otherix packages.
pub mod otherix {
    /// The public control-plane API.
    pub mod v1 {
        tonic::include_proto!("otherix.v1");
    }
    /// Records the control plane keeps in etcd (`proto-internal/`: not part
    /// of the published contract, nor of [`FILE_DESCRIPTOR_SET`]).
    pub mod store {
        /// Version 1 of the store records.
        pub mod v1 {
            tonic::include_proto!("otherix.store.v1");
        }
    }
    /// The control plane <-> agent API.
    pub mod agent {
        /// Version 1 of the agent API.
        pub mod v1 {
            tonic::include_proto!("otherix.agent.v1");
        }
    }
}

/// Vendored Google API packages.
pub mod google {
    /// google.api (HTTP annotations).
    pub mod api {
        tonic::include_proto!("google.api");
    }
    /// google.rpc (Status and error details).
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

pub use otherix::v1;

/// The encoded `FileDescriptorSet` of every proto in the contract, imports included.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/otherix_descriptor.bin"));
