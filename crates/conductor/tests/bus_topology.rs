//! `convoy bus setup` declares the conductor's queues from `convoy_bus::QueueSpec`; the
//! conductor must declare them with the same names, bindings and arguments, or its own
//! declaration would fail against the broker (PRECONDITION_FAILED).

use convoy_bus::QueueSpec;
use convoy_conductor::intake;

#[test]
fn the_conductor_declares_the_queues_bus_setup_declares() {
    assert_eq!(
        intake::events_queue("convoy"),
        QueueSpec::conductor_events("convoy")
    );
    assert_eq!(
        intake::heartbeat_queue("convoy"),
        QueueSpec::conductor_heartbeats("convoy")
    );
}
