//! Volume lifecycle operations composed from volume/ and keys/.
