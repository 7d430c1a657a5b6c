//! Kubernetes-shaped object types shared by `control` and `runtime`.
//!
//! No IO lives here: only serde types, defaults and validation.
#![warn(missing_docs)]

pub mod pod;
pub mod probe;
