//! Human size parsing (`10G`, `512M`, `4096`).
