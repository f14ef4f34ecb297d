//! End-to-end scenarios, grouped by the capability they prove.

pub mod foundation;
pub mod sandboxes;
