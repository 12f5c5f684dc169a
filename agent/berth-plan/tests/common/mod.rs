//! Helpers shared by the planner's integration tests.

use berth_plan::NodePlan;
use berth_plan::actual::{ActiveState, ActualState, ActualUnit};

/// What the node would report after applying `plan` exactly.
pub fn applied(plan: &NodePlan) -> ActualState {
    let mut units = Vec::new();
    for slice in &plan.qos_slices {
        units.push(ActualUnit {
            name: slice.name.clone(),
            active_state: ActiveState::Active,
            properties: (*slice.properties).clone(),
            restarts: 0,
        });
    }
    for pod in &plan.pods {
        units.push(ActualUnit {
            name: pod.slice.name.clone(),
            active_state: ActiveState::Active,
            properties: (*pod.slice.properties).clone(),
            restarts: 0,
        });
        for unit in pod.units() {
            units.push(ActualUnit {
                name: unit.name.clone(),
                active_state: ActiveState::Active,
                properties: unit.properties_for_apply().clone(),
                restarts: 0,
            });
        }
    }
    ActualState {
        units,
        ..ActualState::default()
    }
}
