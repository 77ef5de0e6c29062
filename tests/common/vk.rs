//! The Vulkan tests' context: a device, or a visible SKIP line — a failure under
//! `VMBIND_REQUIRE_VULKAN=1` (CI).
#![allow(dead_code)]

use std::sync::Arc;

use vmbind::vk::Vk;

/// Whether CI demands a device (and so no SKIP).
pub fn required() -> bool {
    std::env::var("VMBIND_REQUIRE_VULKAN").is_ok_and(|v| v == "1")
}

/// Skips `test` with a visible line because of `why`, or fails when a device is required.
pub fn skip(test: &str, why: &str) {
    assert!(!required(), "{test}: VMBIND_REQUIRE_VULKAN=1 but {why}");
    eprintln!("SKIP {test}: {why}");
}

/// The context, printing the device; `None` after [`skip`].
pub fn context(test: &str) -> Option<Arc<Vk>> {
    match Vk::new() {
        Ok(c) => {
            eprintln!(
                "{test}: Vulkan device {} ({}, {}), sparse {:?}, validation layer {}",
                c.device_name(),
                c.info().driver,
                c.info().api,
                c.info().sparse,
                if c.validating() { "on" } else { "off" }
            );
            Some(c)
        }
        Err(e) => {
            skip(test, &format!("no Vulkan device: {e}"));
            None
        }
    }
}

/// Validation messages fail the test (when the layer is on).
pub fn no_validation_messages(ctx: &Vk) {
    let m = ctx.validation_messages();
    assert!(m.is_empty(), "validation layer: {m:#?}");
}
