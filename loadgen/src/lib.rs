//! tapgate load generator.
