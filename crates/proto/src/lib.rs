//! Wire types, identifiers and limits shared by every specswarm crate.
//!
//! This crate has no async runtime and no heavy dependencies: it is the vocabulary the
//! engine, the network stack and the gateway agree on. Every bound the system enforces lives in
//! [`limits`], with its unit last in its name.

pub mod limits;
pub mod wire;
