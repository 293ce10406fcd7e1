//! containerd-shim-husk-v2 (filled by the shim issue).
