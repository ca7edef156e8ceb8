//! The specswarm inference engine (skeleton).
