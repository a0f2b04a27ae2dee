//! Property test of the rollout state machine against a simple model: under arbitrary
//! sequences of successes, failures, silences (deadlines), duplicate, stale and late results,
//! restarts (a save and reload), pauses, retries and aborts, it keeps batch order, the
//! failure budget and once-only execution.

use chrono::{DateTime, Duration, TimeZone, Utc};
use convoy_conductor::config::OnFailure;
use convoy_conductor::plan::{BatchPlan, BatchSize, Budget};
use convoy_conductor::rollout::{
    AGENT_SKEW, Dispatch, HostReport, HostState, Rollout, RolloutKind, RolloutSpec, RolloutState,
    Strategy as Plan,
};
use convoy_message::names::{HostName, Name, RefName, ReleaseId, Sha};
use proptest::prelude::*;
use std::collections::HashMap;
use uuid::Uuid;

#[derive(Clone, Debug)]
enum Op {
    Advance(i64),
    Succeed(usize),
    Fail(usize),
    /// A result for a command this rollout never issued.
    Stale,
    /// The last result delivered again.
    Duplicate,
    /// The conductor restarts: the rollout is saved and loaded again.
    Restart,
    Retry,
    Pause,
    Resume,
    Abort,
    /// An undo (rollback of a host) answers.
    UndoDone(usize, bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1i64..900).prop_map(Op::Advance),
        8 => (0usize..12).prop_map(Op::Succeed),
        3 => (0usize..12).prop_map(Op::Fail),
        1 => Just(Op::Stale),
        2 => Just(Op::Duplicate),
        2 => Just(Op::Restart),
        2 => Just(Op::Retry),
        1 => Just(Op::Pause),
        2 => Just(Op::Resume),
        1 => Just(Op::Abort),
        2 => ((0usize..12), any::<bool>()).prop_map(|(h, ok)| Op::UndoDone(h, ok)),
    ]
}

fn strategy() -> impl Strategy<Value = Plan> {
    (
        prop::collection::vec(1u32..5, 1..4),
        0u32..3,
        60u64..600,
        prop_oneof![Just(0u64), 1u64..200],
        any::<bool>(),
    )
        .prop_map(|(sizes, budget, deadline, pause, rollback)| Plan {
            batches: BatchPlan(sizes.into_iter().map(BatchSize::Count).collect()),
            max_failures: Budget::Count(budget),
            host_deadline_s: deadline,
            pause_s: pause,
            on_failure: if rollback {
                OnFailure::Rollback
            } else {
                OnFailure::Halt
            },
        })
}

/// What the model remembers of each host's commands.
#[derive(Default, Clone)]
struct HostModel {
    ids: Vec<Uuid>,
    /// When the newest id expires (for the agents' skew rule).
    expires: Option<DateTime<Utc>>,
    /// A definite outcome reported for the newest id.
    outcome: Option<bool>,
    /// Retries since the newest id was issued.
    retries_since: u32,
}

fn spec(strategy: Plan) -> RolloutSpec {
    RolloutSpec {
        app: Name::new("web").unwrap(),
        stage: "prod".into(),
        repo: Name::new("web").unwrap(),
        kind: RolloutKind::Deploy,
        git_ref: Some(RefName::new("refs/tags/v1").unwrap()),
        commit: Some(Sha::new("a".repeat(40)).unwrap()),
        release: ReleaseId::new("r1").unwrap(),
        strategy,
        started_by: "model".into(),
        pipeline: None,
    }
}

fn check(
    r: &Rollout,
    before: &Rollout,
    dispatched: &[Dispatch],
    model: &mut [HostModel],
    now: DateTime<Utc>,
) -> Result<(), TestCaseError> {
    for d in dispatched {
        let h = &r.hosts[d.host];
        if d.undo {
            prop_assert_eq!(
                r.state,
                RolloutState::RollingBack,
                "undo only while rolling back"
            );
            prop_assert_eq!(
                h.state,
                HostState::Succeeded,
                "undo only of a host that switched"
            );
            prop_assert!(h.before.is_some(), "undo only to a known earlier release");
            continue;
        }
        let m = &mut model[d.host];
        if d.resend {
            prop_assert_eq!(
                m.ids.last(),
                Some(&d.command),
                "a resend repeats the newest id"
            );
            continue;
        }
        // Batch order: every host of an earlier batch has a definite outcome.
        for other in &r.hosts {
            if other.batch < h.batch {
                prop_assert!(
                    matches!(other.state, HostState::Succeeded | HostState::Failed),
                    "host of batch {} sent while {} of batch {} is {:?}",
                    h.batch,
                    other.host,
                    other.batch,
                    other.state
                );
            }
        }
        // Budget and deadlines: nothing new once exceeded.
        prop_assert!(
            r.failures() <= r.allowed_failures(),
            "sent beyond the failure budget"
        );
        prop_assert!(
            !r.hosts.iter().any(|x| x.state == HostState::TimedOut),
            "sent while a host is silent past its deadline"
        );
        prop_assert_eq!(r.state, RolloutState::Running, "sent while not running");
        // Once-only: a new id only after a definite failure or an expired command, and a retry.
        if let Some(_prev) = m.ids.last() {
            let expired = m.expires.is_some_and(|e| now > e + AGENT_SKEW);
            prop_assert!(
                m.outcome != Some(true),
                "a host that succeeded got a new command"
            );
            prop_assert!(
                m.retries_since > 0 && (m.outcome == Some(false) || expired),
                "a host got a second command id without a retry after a failure or expiry"
            );
        }
        m.ids.push(d.command);
        m.expires = h.expires_at;
        m.outcome = None;
        m.retries_since = 0;
    }
    if r.state == RolloutState::Succeeded {
        prop_assert!(
            r.hosts
                .iter()
                .all(|h| matches!(h.state, HostState::Succeeded | HostState::Failed))
        );
        prop_assert!(r.failures() <= r.allowed_failures());
    }
    if before.state.is_terminal() {
        prop_assert_eq!(before.state, r.state, "an ended rollout came back to life");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn rollouts_keep_order_budget_and_once_only(
        hosts in 1usize..12,
        strategy in strategy(),
        ops in prop::collection::vec(op(), 1..120),
    ) {
        let mut now = Utc.with_ymd_and_hms(2026, 11, 23, 10, 0, 0).unwrap();
        let names: Vec<HostName> = (0..hosts).map(|i| HostName::new(format!("h{i}")).unwrap()).collect();
        let mut r = Rollout::new(1, spec(strategy), names, now);
        let mut model = vec![HostModel::default(); hosts];
        let mut last_report: Option<HostReport> = None;
        let before = r.clone();
        let first = r.tick(now);
        check(&r, &before, &first, &mut model, now)?;
        for op in ops {
            let before = r.clone();
            let dispatched: Vec<Dispatch> = match op {
                Op::Advance(s) => {
                    now += Duration::seconds(s);
                    r.tick(now)
                }
                Op::Succeed(h) | Op::Fail(h) => {
                    let h = h % hosts;
                    let ok = matches!(op, Op::Succeed(_));
                    match (r.hosts[h].command, r.hosts[h].state) {
                        (Some(id), HostState::Sent | HostState::TimedOut) => {
                            let report = HostReport {
                                command: id,
                                succeeded: ok,
                                error: (!ok).then(|| "health failed".into()),
                                rolled_back: !ok,
                                previous: Some(ReleaseId::new("r0").unwrap()),
                                duration_ms: 5,
                            };
                            if r.record(&report, now) && model[h].ids.last() == Some(&id) {
                                model[h].outcome = Some(ok);
                            }
                            last_report = Some(report);
                            r.tick(now)
                        }
                        _ => Vec::new(),
                    }
                }
                Op::Stale => {
                    let report = HostReport {
                        command: Uuid::new_v4(),
                        succeeded: true,
                        error: None,
                        rolled_back: false,
                        previous: None,
                        duration_ms: 1,
                    };
                    prop_assert!(!r.record(&report, now), "an unknown result was taken");
                    r.tick(now)
                }
                Op::Duplicate => match &last_report {
                    Some(report) => {
                        prop_assert!(!r.record(report, now), "a duplicate result was taken twice");
                        r.tick(now)
                    }
                    None => Vec::new(),
                },
                Op::Restart => {
                    let saved = serde_json::to_string(&r).unwrap();
                    r = serde_json::from_str(&saved).unwrap();
                    prop_assert_eq!(&r, &before, "a reload changed the rollout");
                    let resend = r.in_flight();
                    let mut out = resend;
                    out.extend(r.tick(now));
                    out
                }
                Op::Retry => match r.retry(now) {
                    Ok(out) => {
                        for m in &mut model {
                            m.retries_since += 1;
                        }
                        out
                    }
                    Err(_) => {
                        prop_assert_ne!(before.state, RolloutState::Halted);
                        Vec::new()
                    }
                },
                Op::Pause => {
                    let _ = r.pause(now);
                    Vec::new()
                }
                Op::Resume => match r.resume(now) {
                    Ok(()) => r.tick(now),
                    Err(_) => Vec::new(),
                },
                Op::Abort => {
                    let _ = r.abort(RolloutState::Aborted, "model".into(), now);
                    Vec::new()
                }
                Op::UndoDone(h, ok) => {
                    let h = h % hosts;
                    match r.hosts[h].undo.as_ref().map(|u| (u.command, u.state)) {
                        Some((id, HostState::Sent)) => {
                            let report = HostReport {
                                command: id,
                                succeeded: ok,
                                error: None,
                                rolled_back: false,
                                previous: None,
                                duration_ms: 1,
                                    };
                            prop_assert!(r.record(&report, now));
                            r.tick(now)
                        }
                        _ => Vec::new(),
                    }
                }
            };
            check(&r, &before, &dispatched, &mut model, now)?;
        }
        // Every id issued to a host is distinct, and a host never holds two live commands.
        let mut all: HashMap<Uuid, usize> = HashMap::new();
        for (h, m) in model.iter().enumerate() {
            for id in &m.ids {
                prop_assert!(all.insert(*id, h).is_none(), "a command id was issued twice");
            }
        }
    }
}

#[test]
fn a_timed_out_host_halts_and_is_never_skipped() {
    let now = Utc.with_ymd_and_hms(2026, 11, 23, 10, 0, 0).unwrap();
    let mut r = hosts_a_and_b(1, 5, now);
    let sent = r.tick(now);
    assert_eq!(sent.len(), 1);
    let later = now + Duration::seconds(61);
    assert!(r.tick(later).is_empty());
    assert_eq!(r.state, RolloutState::Halted);
    assert_eq!(r.hosts[0].state, HostState::TimedOut);
    assert_eq!(r.hosts[1].state, HostState::Pending, "b was not skipped to");
    // Retried within the command's life: the same command again, not a second one.
    let again = r.retry(later).unwrap();
    assert_eq!(again.len(), 1);
    assert!(again[0].resend);
    assert_eq!(again[0].command, sent[0].command);
}

/// A retry re-sends a timed-out host its command; the failure of the attempt it replaces
/// (begun a deadline before the retry) arrives afterwards: the host gets a new command
/// rather than failing the retry. A failure of a run begun after the retry fails it.
#[test]
fn a_failure_from_before_a_retry_gets_the_host_a_new_command() {
    let now = Utc.with_ymd_and_hms(2026, 12, 6, 10, 0, 0).unwrap();
    let failed = |command, duration_ms| HostReport {
        command,
        succeeded: false,
        error: Some("build exited with status 1".into()),
        rolled_back: false,
        previous: None,
        duration_ms,
    };

    // The agent began at once and ran 61 s; its failure comes in just after the retry.
    let mut r = hosts_a_and_b(1, 0, now);
    let sent = r.tick(now);
    let later = now + Duration::seconds(61);
    assert!(r.tick(later).is_empty());
    assert_eq!(r.state, RolloutState::Halted);
    let again = r.retry(later).unwrap();
    assert_eq!(again[0].command, sent[0].command);
    assert!(r.record(&failed(sent[0].command, 61_000), later));
    let fresh = r.tick(later);
    assert_eq!(fresh.len(), 1, "a new command for the host");
    assert!(!fresh[0].resend);
    assert_ne!(fresh[0].command, sent[0].command);
    assert_eq!(r.state, RolloutState::Running);
    assert_eq!(r.hosts[0].attempts, 2);
    // The old command's result again (the agent answering the re-sent copy from its
    // journal) changes nothing.
    assert!(!r.record(&failed(sent[0].command, 61_000), later));

    // The agent was down and began only when the retry's copy reached it (a 3 s run
    // reported 5 s after the retry): that failure is the retry's own, and the host fails.
    let mut r = hosts_a_and_b(1, 0, now);
    let sent = r.tick(now);
    assert!(r.tick(later).is_empty());
    r.retry(later).unwrap();
    let reported = later + Duration::seconds(5);
    assert!(r.record(&failed(sent[0].command, 3_000), reported));
    assert!(r.tick(reported).is_empty());
    assert_eq!(r.hosts[0].state, HostState::Failed);
    assert_eq!(r.state, RolloutState::Halted);

    // Aborted after the retry: the old failure is only recorded; nothing is planned.
    let mut r = hosts_a_and_b(1, 0, now);
    let sent = r.tick(now);
    assert!(r.tick(later).is_empty());
    r.retry(later).unwrap();
    r.abort(RolloutState::Aborted, "test".into(), later)
        .unwrap();
    assert!(r.record(&failed(sent[0].command, 61_000), later));
    assert_eq!(r.hosts[0].state, HostState::Failed);
    assert!(r.tick(later).is_empty());
}

/// A rollout the conductor held (a paused start) and then lets go: a host still waiting on
/// a valid command gets that same command again with a fresh deadline; one whose command
/// expired meanwhile gets a new command, never none.
#[test]
fn rearming_a_held_rollout_resends_valid_commands_and_replans_expired_ones() {
    let now = Utc.with_ymd_and_hms(2026, 12, 6, 10, 0, 0).unwrap();
    let mut r = hosts_a_and_b(2, 0, now);
    let sent = r.tick(now);
    assert_eq!(sent.len(), 2);

    // Within the commands' life: the same two, deadlines from now.
    let soon = now + Duration::seconds(30);
    let again = r.rearm(soon);
    assert_eq!(again.len(), 2);
    assert!(again.iter().all(|d| d.resend && !d.undo));
    assert_eq!(again[0].command, sent[0].command);
    assert_eq!(r.hosts[0].deadline_at, Some(soon + Duration::seconds(60)));
    assert!(r.tick(now + Duration::seconds(61)).is_empty());
    assert_eq!(r.state, RolloutState::Running, "the new deadline holds");

    // Long after: the commands expired; each host is planned again with a new command.
    let much_later = now + Duration::seconds(3_600);
    assert!(r.rearm(much_later).is_empty());
    assert!(r.hosts.iter().all(|h| h.state == HostState::Pending));
    let fresh = r.tick(much_later);
    assert_eq!(fresh.len(), 2);
    assert!(fresh.iter().all(|d| !d.resend));
    assert!(
        fresh
            .iter()
            .all(|d| sent.iter().all(|s| s.command != d.command))
    );
}

/// A rollout to hosts `a` and `b` in batches of `batch`, halting past `max_failures`, with
/// a 60 s host deadline.
fn hosts_a_and_b(batch: u32, max_failures: u32, now: DateTime<Utc>) -> Rollout {
    let strategy = Plan {
        batches: BatchPlan(vec![BatchSize::Count(batch)]),
        max_failures: Budget::Count(max_failures),
        host_deadline_s: 60,
        pause_s: 0,
        on_failure: OnFailure::Halt,
    };
    let hosts = vec![HostName::new("a").unwrap(), HostName::new("b").unwrap()];
    Rollout::new(1, spec(strategy), hosts, now)
}
