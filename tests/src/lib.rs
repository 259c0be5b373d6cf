//! Integration tests live in tests/e2e.rs; fixtures in fixtures/.
