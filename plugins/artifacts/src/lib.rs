//! Paths of the guest plugins' components, built from `plugins/guests` by
//! this crate's build script. The host's tests and benchmarks load them from
//! here; nothing in the kernel's release build depends on this crate.

include!(concat!(env!("OUT_DIR"), "/components.rs"));
