//! Flotilla's node agent: pod runtimes and the loop that keeps them in sync with the API server.
#![warn(missing_docs)]
