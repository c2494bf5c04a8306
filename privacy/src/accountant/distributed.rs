//! Distributed DP accounting (in progress).
