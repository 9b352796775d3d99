//! Magic numbers and flag values from the NBD specification.
// filled in by the protocol layer
