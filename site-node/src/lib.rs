//! The site node: the agent a hospital or bank runs next to its data.
//!
//! Training with tch/libtorch and the `tutela-node` binary arrive with the issue "Federated
//! training end to end". Until then this crate does not link libtorch.
