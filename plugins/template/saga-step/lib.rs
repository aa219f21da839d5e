//! `{{name}}`: a step of the order saga.
//!
//! As made by `commerce-kernel plugin new`, it checks nothing: `execute`
//! records how many items the order has, and `compensate` has nothing to
//! undo. Insert it into the saga with the `defineSaga` mutation, then make
//! `execute` do its work (refuse an order with `Failure::Permanent`, which
//! fails the order and undoes the steps before this one).
//!
//! `execute` returns JSON, handed to later steps and to `compensate`.
//! `compensate` must be idempotent, and is given `null` as the output when
//! `execute`'s outcome was never recorded. This step uses Rust's std, which
//! needs the sandboxed WASI runtime: `wasi = true` in `plugin.toml`.

wit_bindgen::generate!({ path: "wit", world: "saga-step-plugin-with-host" });

use commerce::plugin::types::Failure;
use exports::commerce::plugin::saga_step::{Guest, StepContext};

struct Plugin;

impl Guest for Plugin {
    fn execute(context: StepContext) -> Result<String, Failure> {
        // TODO: the step's work.
        let items: u64 = context
            .order
            .lines
            .iter()
            .map(|line| u64::from(line.quantity))
            .sum();
        Ok(format!("{{\"items\":{items}}}"))
    }

    fn compensate(_context: StepContext, _output: String) -> Result<(), Failure> {
        // TODO: undo what `execute` did. It did nothing outside its call.
        Ok(())
    }
}

export!(Plugin);
