//! End-to-end scenarios, grouped by the capability they prove.

pub mod control_plane;
pub mod foundation;
pub mod sandboxes;
pub mod sealing;
