//! tapgate gateway.
