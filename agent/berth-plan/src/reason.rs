//! Why a unit did not start or change, in the words `kubectl` would use
//! where one exists, and why the plan holds a unit back.

use serde::{Deserialize, Serialize};

/// Why an action failed, in the words `kubectl` would use where one exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum FailureReason {
    /// The image is not in the local store.
    ImageNotPresent,
    /// The image is being pulled (what `kubectl` shows while it is).
    ContainerCreating,
    /// The last pull of the image failed.
    ErrImagePull,
    /// The pull failed and is not tried again before its back-off ends.
    ImagePullBackOff,
    /// `imagePullPolicy: Never` and the image is not in the store.
    ErrImageNeverPull,
    /// The image reference is not one.
    InvalidImageName,
    /// The container's root could not be prepared or mounted.
    CreateContainerError,
    /// systemd refused the unit or one of its properties.
    CreateContainerConfigError,
    /// The start job failed (a missing binary, a bad user, ...).
    StartError,
    /// Stopping or changing a unit failed.
    KillError,
    /// A unit it depends on (its slice, an init container) failed first.
    DependencyFailed,
    /// The pod's network (namespace, address, veth) could not be made.
    FailedCreatePodSandBox,
    /// A volume could not be made ready (a claim not bound, a subPath
    /// leading out of its volume, a hostPath not allowed).
    FailedMount,
}

impl FailureReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::ImageNotPresent => "ImageNotPresent",
            FailureReason::ContainerCreating => "ContainerCreating",
            FailureReason::ErrImagePull => "ErrImagePull",
            FailureReason::ImagePullBackOff => "ImagePullBackOff",
            FailureReason::ErrImageNeverPull => "ErrImageNeverPull",
            FailureReason::InvalidImageName => "InvalidImageName",
            FailureReason::CreateContainerError => "CreateContainerError",
            FailureReason::CreateContainerConfigError => "CreateContainerConfigError",
            FailureReason::StartError => "StartError",
            FailureReason::KillError => "KillError",
            FailureReason::DependencyFailed => "DependencyFailed",
            FailureReason::FailedCreatePodSandBox => "FailedCreatePodSandBox",
            FailureReason::FailedMount => "FailedMount",
        }
    }

    /// A pull under way or backing off: progress the pod's status shows,
    /// not a difference from Git (its message changes from pass to pass).
    pub fn is_pulling(self) -> bool {
        matches!(
            self,
            FailureReason::ContainerCreating
                | FailureReason::ErrImagePull
                | FailureReason::ImagePullBackOff
        )
    }
}

/// Why the plan leaves a unit as it is in this pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum HoldReason {
    /// The pod waits for something the node prepares (its image, its
    /// network, its volumes); its status shows this reason.
    Waiting(FailureReason),
    /// The object is not valid in this revision: its last good state keeps
    /// running and nothing of it is pruned.
    LastGoodKept,
    /// The unit drifted and its policy is `report`: left as found.
    DriftReported,
    /// A Deployment's rollout holds the pod: a new one that waits its turn,
    /// or an old one kept running until new ones are available.
    Rollout,
}

impl HoldReason {
    pub fn as_str(self) -> &'static str {
        match self {
            HoldReason::Waiting(r) => r.as_str(),
            HoldReason::LastGoodKept => "LastGoodKept",
            HoldReason::DriftReported => "DriftReported",
            HoldReason::Rollout => "Rollout",
        }
    }
}

impl Serialize for HoldReason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}
