//! Store integration tests: one binary, modules by topic.
