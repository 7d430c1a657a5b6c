//! Shared harness for Flotilla's cross-crate tests.
