//! The fleet as heartbeats show it: each host alive, stale or gone, its labels and what it runs.
//!
//! Kept in memory only: after a restart the fleet is whole again within one heartbeat
//! interval. Rollouts never depend on it for their hosts once created (their host lists are
//! stored).

use chrono::{DateTime, Utc};
use convoy_message::Heartbeat;
use convoy_message::names::HostName;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Liveness {
    Alive,
    /// Missed a few heartbeats.
    Stale,
    /// Silent for long: probably decommissioned or cut off.
    Gone,
}

impl Liveness {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Alive => "alive",
            Self::Stale => "stale",
            Self::Gone => "gone",
        }
    }
}

/// One host as the dashboard and the CLI show it.
#[derive(Clone, Debug, Serialize)]
pub struct HostView {
    pub host: HostName,
    pub liveness: Liveness,
    pub last_seen: DateTime<Utc>,
    pub labels: BTreeMap<String, String>,
    pub versions: BTreeMap<String, String>,
    /// app → current release.
    pub apps: BTreeMap<String, Option<String>>,
    pub load: [f64; 3],
    pub disk_free_bytes: u64,
}

struct Entry {
    beat: Heartbeat,
    seen: DateTime<Utc>,
}

/// Heartbeats by host.
pub struct Fleet {
    hosts: Mutex<HashMap<HostName, Entry>>,
    stale_after: u32,
    gone_after: u32,
}

impl Fleet {
    pub fn new(stale_after: u32, gone_after: u32) -> Self {
        Self {
            hosts: Mutex::new(HashMap::new()),
            stale_after,
            gone_after,
        }
    }

    /// Records a heartbeat; true when the host was not alive before (joined or came back).
    pub fn beat(&self, beat: Heartbeat, now: DateTime<Utc>) -> bool {
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        let was_alive = hosts
            .get(&beat.host)
            .is_some_and(|e| self.liveness(e, now) == Liveness::Alive);
        hosts.insert(beat.host.clone(), Entry { beat, seen: now });
        !was_alive
    }

    fn liveness(&self, e: &Entry, now: DateTime<Utc>) -> Liveness {
        let interval = i64::from(e.beat.interval_s.max(1));
        let silent = (now - e.seen).num_seconds();
        if silent > interval * i64::from(self.gone_after) {
            Liveness::Gone
        } else if silent > interval * i64::from(self.stale_after) {
            Liveness::Stale
        } else {
            Liveness::Alive
        }
    }

    pub fn len(&self) -> usize {
        self.hosts.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every host, by name.
    pub fn view(&self, now: DateTime<Utc>) -> Vec<HostView> {
        let hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<HostView> = hosts
            .values()
            .map(|e| HostView {
                host: e.beat.host.clone(),
                liveness: self.liveness(e, now),
                last_seen: e.seen,
                labels: e.beat.labels.clone(),
                versions: e.beat.versions.clone(),
                apps: e
                    .beat
                    .apps
                    .iter()
                    .map(|(app, rel)| {
                        (app.to_string(), rel.current.as_ref().map(|r| r.to_string()))
                    })
                    .collect(),
                load: e.beat.load,
                disk_free_bytes: e.beat.disk_free_bytes,
            })
            .collect();
        out.sort_by(|a, b| a.host.cmp(&b.host));
        out
    }

    /// Hosts whose labels include all of `labels`, and how alive each is.
    pub fn matching(
        &self,
        labels: &BTreeMap<String, String>,
        now: DateTime<Utc>,
    ) -> Vec<(HostName, Liveness)> {
        let hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<(HostName, Liveness)> = hosts
            .values()
            .filter(|e| labels.iter().all(|(k, v)| e.beat.labels.get(k) == Some(v)))
            .map(|e| (e.beat.host.clone(), self.liveness(e, now)))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    pub fn liveness_of(&self, host: &HostName, now: DateTime<Utc>) -> Option<Liveness> {
        let hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        hosts.get(host).map(|e| self.liveness(e, now))
    }

    /// Hosts per liveness, for metrics.
    pub fn counts(&self, now: DateTime<Utc>) -> [usize; 3] {
        let hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = [0; 3];
        for e in hosts.values() {
            out[self.liveness(e, now) as usize] += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    fn beat(host: &str, labels: &[(&str, &str)]) -> Heartbeat {
        Heartbeat {
            host: HostName::new(host).unwrap(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            versions: BTreeMap::new(),
            apps: BTreeMap::new(),
            load: [0.0; 3],
            disk_free_bytes: 0,
            interval_s: 10,
            started_at: Utc::now(),
        }
    }

    #[test]
    fn liveness_follows_missed_intervals_and_labels_select_hosts() {
        let fleet = Fleet::new(3, 30);
        let t = Utc::now();
        assert!(fleet.beat(beat("web-1", &[("role", "web"), ("stage", "prod")]), t));
        assert!(
            !fleet.beat(beat("web-1", &[("role", "web"), ("stage", "prod")]), t),
            "already alive"
        );
        fleet.beat(
            beat("web-2", &[("role", "web"), ("stage", "canary")]),
            t - Duration::seconds(45),
        );
        fleet.beat(
            beat("db-1", &[("role", "db"), ("stage", "prod")]),
            t - Duration::seconds(400),
        );
        let prod: BTreeMap<String, String> = [("stage".to_owned(), "prod".to_owned())].into();
        let web: BTreeMap<String, String> = [("role".to_owned(), "web".to_owned())].into();
        let names = |v: Vec<(HostName, Liveness)>| {
            v.into_iter()
                .map(|(h, l)| format!("{h}:{}", l.as_str()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(fleet.matching(&prod, t)),
            vec!["db-1:gone", "web-1:alive"]
        );
        assert_eq!(
            names(fleet.matching(&web, t)),
            vec!["web-1:alive", "web-2:stale"]
        );
        assert_eq!(fleet.counts(t), [1, 1, 1]);
        // A host that comes back is announced again.
        assert!(fleet.beat(beat("db-1", &[("role", "db")]), t));
    }
}
