//! Routes today's OpenComputer clients call that this appliance cannot honour. Each answers
//! `501 {"error": "<why>"}` whatever its method, never a silent success, so a client fails
//! loudly at the call instead of believing a sandbox was checkpointed or scaled. Paths
//! that no client calls stay unmatched (404).

/// A feature of the hosted service the appliance does not have, named by the route(s) that ask
/// for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsupported {
    Scale,
    Autoscale,
    ScalingLock,
    CheckpointPatches,
    CheckpointPatch,
    CheckpointPublish,
    Preview,
    PreviewPort,
    PreviewRotate,
    Agent,
    AgentSession,
    Mounts,
    SandboxUsage,
    SandboxTags,
    Usage,
    Tags,
    Snapshots,
    Snapshot,
    Webhooks,
}

/// Which unsupported feature the path segments after `/api/` ask for, if any.
pub fn feature(s: &[&str]) -> Option<Unsupported> {
    use Unsupported as U;
    Some(match s {
        ["sandboxes", "checkpoints", _, "patches"] => U::CheckpointPatches,
        ["sandboxes", "checkpoints", _, "publish" | "unpublish"] => U::CheckpointPublish,
        ["sandboxes", "checkpoints", _, "patches", _] => U::CheckpointPatch,
        ["sandboxes", _, "scale"] => U::Scale,
        ["sandboxes", _, "autoscale"] => U::Autoscale,
        ["sandboxes", _, "scaling-lock"] => U::ScalingLock,
        ["sandboxes", _, "preview"] => U::Preview,
        ["sandboxes", _, "preview", "rotate"] => U::PreviewRotate,
        ["sandboxes", _, "preview", _] => U::PreviewPort,
        ["sandboxes", _, "agent"] => U::Agent,
        ["sandboxes", _, "agent", _] | ["sandboxes", _, "agent", _, "kill" | "prompt" | "interrupt"] => U::AgentSession,
        ["sandboxes", _, "mounts"] => U::Mounts,
        ["sandboxes", _, "usage"] => U::SandboxUsage,
        ["sandboxes", _, "tags"] => U::SandboxTags,
        ["usage"] => U::Usage,
        ["tags"] => U::Tags,
        ["snapshots"] => U::Snapshots,
        ["snapshots", ..] => U::Snapshot,
        ["webhooks", ..] => U::Webhooks,
        _ => return None,
    })
}

impl Unsupported {
    /// Route pattern, used as the metrics label.
    pub fn label(self) -> &'static str {
        use Unsupported as U;
        match self {
            U::Scale => "/api/sandboxes/{id}/scale",
            U::Autoscale => "/api/sandboxes/{id}/autoscale",
            U::ScalingLock => "/api/sandboxes/{id}/scaling-lock",
            U::CheckpointPatches => "/api/sandboxes/checkpoints/{checkpointId}/patches",
            U::CheckpointPatch => "/api/sandboxes/checkpoints/{checkpointId}/patches/{patchId}",
            U::CheckpointPublish => "/api/sandboxes/checkpoints/{checkpointId}/publish",
            U::Preview => "/api/sandboxes/{id}/preview",
            U::PreviewPort => "/api/sandboxes/{id}/preview/{port}",
            U::PreviewRotate => "/api/sandboxes/{id}/preview/rotate",
            U::Agent => "/api/sandboxes/{id}/agent",
            U::AgentSession => "/api/sandboxes/{id}/agent/{sid}",
            U::Mounts => "/api/sandboxes/{id}/mounts",
            U::SandboxUsage => "/api/sandboxes/{id}/usage",
            U::SandboxTags => "/api/sandboxes/{id}/tags",
            U::Usage => "/api/usage",
            U::Tags => "/api/tags",
            U::Snapshots => "/api/snapshots",
            U::Snapshot => "/api/snapshots/{name}",
            U::Webhooks => "/api/webhooks",
        }
    }

    /// Why the appliance cannot do it, as the 501 answer says.
    pub fn reason(self) -> &'static str {
        use Unsupported as U;
        match self {
            U::Scale | U::Autoscale | U::ScalingLock => {
                "this appliance does not resize running sandboxes: a sandbox keeps the cpuCount and memoryMB it was created with"
            }
            U::CheckpointPatches | U::CheckpointPatch => {
                "this appliance does not patch checkpoints: take a new checkpoint after changing the sandbox"
            }
            U::CheckpointPublish => {
                "this appliance does not publish checkpoints: fork any checkpoint of your projects by its id"
            }
            U::Preview | U::PreviewPort | U::PreviewRotate => {
                "this appliance has no preview URLs: sandboxes have no network device and nothing outside reaches their ports"
            }
            U::Agent | U::AgentSession => {
                "this appliance does not run hosted agent sessions; run the agent yourself with exec"
            }
            U::Mounts => {
                "this appliance does not mount remote file systems into sandboxes: their only way out is the egress proxy"
            }
            U::SandboxUsage | U::Usage => "this appliance does not meter usage; /metrics has its resource gauges",
            U::SandboxTags | U::Tags => {
                "this appliance has no sandbox tags; give metadata at create and filter GET /api/sandboxes with ?metadata="
            }
            U::Snapshots | U::Snapshot => {
                "this appliance does not build images: import an image archive as a template (POST /api/templates) or save a sandbox as one (POST /api/sandboxes/{id}/template)"
            }
            U::Webhooks => "this appliance sends no webhooks",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_paths_map_to_features() {
        assert_eq!(feature(&["sandboxes", "s1", "scale"]), Some(Unsupported::Scale));
        // Hibernate and wake are served (`hibernation`), not refused.
        assert_eq!(feature(&["sandboxes", "s1", "hibernate"]), None);
        assert_eq!(feature(&["sandboxes", "s1", "preview", "rotate"]), Some(Unsupported::PreviewRotate));
        assert_eq!(feature(&["sandboxes", "s1", "preview", "3000"]), Some(Unsupported::PreviewPort));
        // Checkpoints and forks are served (`checkpoints`); publishing them is not.
        assert_eq!(feature(&["sandboxes", "from-checkpoint", "c1"]), None);
        assert_eq!(feature(&["sandboxes", "s1", "checkpoints", "c1", "restore"]), None);
        assert_eq!(feature(&["sandboxes", "checkpoints", "c1", "publish"]), Some(Unsupported::CheckpointPublish));
        assert_eq!(feature(&["sandboxes", "checkpoints", "c1", "patches", "p"]), Some(Unsupported::CheckpointPatch));
        assert_eq!(feature(&["sandboxes", "s1", "nothing"]), None);
        // Signed file URLs are served (`api::signed_urls`), not refused.
        assert_eq!(feature(&["sandboxes", "s1", "files", "download-url"]), None);
        assert_eq!(feature(&["projects"]), None);
    }
}
