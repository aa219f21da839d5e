//! Fault hooks for the crash and takeover tests: named points in the saga
//! runner (`before-call:payment`, `after-compensation:shipment`, ...) at
//! which a test makes the runner stop for good, wait, or panic.
//!
//! They exist only in builds with the `test-hooks` feature, which the test
//! suites enable and a release build does not: without it [`FaultHooks`]
//! has nothing in it, every point is a no-op, and the kernel refuses to
//! start when `COMMERCE_TEST_PAUSE_AT` is set (see `config.rs`).
//!
//! The setting is a comma-separated list of `<when>:<step>[=<action>]`:
//! - no action: print `saga paused at <point>` and wait forever (the test
//!   kills the process there);
//! - `=<ms>`: print `saga delayed at <point>` and wait that long, then go on;
//! - `=panic`: panic there, once; `=panic-always`: every time.

#[cfg(feature = "test-hooks")]
use std::sync::Arc;
#[cfg(feature = "test-hooks")]
use std::sync::atomic::{AtomicBool, Ordering};
#[cfg(feature = "test-hooks")]
use std::time::Duration;

/// The runner's fault hooks; empty unless a test sets some.
#[derive(Clone, Debug, Default)]
pub struct FaultHooks {
    #[cfg(feature = "test-hooks")]
    points: Arc<Vec<(String, Action)>>,
}

#[cfg(feature = "test-hooks")]
#[derive(Debug)]
enum Action {
    Stop,
    Delay(Duration),
    /// Set once it has panicked.
    PanicOnce(AtomicBool),
    PanicAlways,
}

impl FaultHooks {
    /// The hooks `COMMERCE_TEST_PAUSE_AT` asks for (`None`: unset). A build
    /// without the `test-hooks` feature refuses any.
    pub fn from_setting(spec: Option<&str>) -> Result<FaultHooks, String> {
        match spec {
            None => Ok(FaultHooks::default()),
            #[cfg(feature = "test-hooks")]
            Some(spec) => Self::parse(spec),
            #[cfg(not(feature = "test-hooks"))]
            Some(_) => Err(
                "this build has no fault hooks: they exist only in builds with the \
                 test-hooks feature, for the test suites"
                    .to_string(),
            ),
        }
    }

    #[cfg(feature = "test-hooks")]
    fn parse(spec: &str) -> Result<FaultHooks, String> {
        let mut points = Vec::new();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (point, action) = match item.split_once('=') {
                None => (item, Action::Stop),
                Some((point, "panic")) => (point, Action::PanicOnce(AtomicBool::new(false))),
                Some((point, "panic-always")) => (point, Action::PanicAlways),
                Some((point, ms)) => {
                    let ms: u64 = ms.parse().map_err(|_| {
                        format!("{item:?}: the action is a number of ms, panic or panic-always")
                    })?;
                    (point, Action::Delay(Duration::from_millis(ms)))
                }
            };
            if !point.contains(':') {
                return Err(format!("{item:?}: a point is <when>:<step>"));
            }
            points.push((point.to_string(), action));
        }
        Ok(FaultHooks {
            points: Arc::new(points),
        })
    }

    /// The runner reached `<when>:<step>`.
    #[cfg_attr(not(feature = "test-hooks"), allow(unused_variables))]
    pub async fn at(&self, when: &str, step: &str) {
        #[cfg(feature = "test-hooks")]
        {
            if self.points.is_empty() {
                return;
            }
            let point = format!("{when}:{step}");
            for (name, action) in self.points.iter() {
                if *name != point {
                    continue;
                }
                match action {
                    Action::Stop => {
                        println!("saga paused at {point}");
                        std::future::pending::<()>().await;
                    }
                    Action::Delay(wait) => {
                        println!("saga delayed at {point}");
                        tokio::time::sleep(*wait).await;
                    }
                    Action::PanicOnce(done) => {
                        if !done.swap(true, Ordering::SeqCst) {
                            panic!("fault hook: panic at {point}");
                        }
                    }
                    Action::PanicAlways => panic!("fault hook: panic at {point}"),
                }
            }
        }
    }
}
