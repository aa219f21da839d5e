//! `misbehaving`: for the host's tests only. A pure saga step that does what
//! its step name asks, so one component covers every hostile case:
//!
//! | step | behaviour |
//! | --- | --- |
//! | `loop` | spins forever |
//! | `allocate` | allocates until memory runs out |
//! | `trap` | executes `unreachable` |
//! | `garbage` | returns output that is not JSON |
//! | `fail-permanent`, `fail-transient` | returns that failure |
//! | anything else | returns `{"step": <name>}` |
//!
//! `compensate` succeeds, except for a step named `fail-compensate`, whose
//! compensation always fails transiently (and whose `execute` succeeds).
#![no_std]
extern crate alloc;

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use plugin_heap as _;

wit_bindgen::generate!({ path: "../../../wit", world: "saga-step-plugin" });

use commerce::plugin::types::{ErrorDetail, Failure};
use exports::commerce::plugin::saga_step::{Guest, StepContext};

struct Misbehaving;

impl Guest for Misbehaving {
    fn execute(context: StepContext) -> Result<String, Failure> {
        match context.step.as_str() {
            "loop" => {
                let mut counter: u64 = 0;
                loop {
                    // Volatile, so the optimiser cannot prove the loop pointless.
                    counter = unsafe { core::ptr::read_volatile(&counter) }.wrapping_add(1);
                }
            }
            "allocate" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(alloc::vec![1u8; 1 << 20]);
                }
            }
            "trap" => core::arch::wasm32::unreachable(),
            "garbage" => Ok("this is not JSON".to_string()),
            "fail-permanent" => Err(Failure::Permanent(detail("refused", "refused on request"))),
            "fail-transient" => Err(Failure::Transient(detail(
                "unavailable",
                "unavailable on request",
            ))),
            step => Ok(format!("{{\"step\":\"{step}\"}}")),
        }
    }

    fn compensate(context: StepContext, _output: String) -> Result<(), Failure> {
        match context.step.as_str() {
            "fail-compensate" => Err(Failure::Transient(detail(
                "unavailable",
                "cannot undo right now",
            ))),
            _ => Ok(()),
        }
    }
}

fn detail(code: &str, message: &str) -> ErrorDetail {
    ErrorDetail {
        code: code.to_string(),
        message: message.to_string(),
    }
}

export!(Misbehaving);
