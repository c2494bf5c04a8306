//! Authorization over certificate identities (casbin RBAC with domains), approval quorum rules and
//! site-local policy.
//!
//! Nothing is implemented here yet: the issue "Policy and signed approvals" fills this crate. It
//! exists so that the workspace has the shape of `DESIGN.md`.
