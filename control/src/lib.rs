//! Flotilla's control plane: API server, scheduler and controllers.
#![warn(missing_docs)]
