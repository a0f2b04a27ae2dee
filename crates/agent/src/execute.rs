//! Executing one verified command, step by step, with every step recorded in the journal
//! before it is taken — so that a restarted agent knows exactly where its predecessor
//! stopped and converges: before the switch, the half-made release is removed and
//! `current` was never touched; after the switch, `current` is put back on the release
//! that was current before, and that release is restarted.

use crate::agent::Ctx;
use crate::config::{AppConfig, HookCommand};
use crate::export;
use crate::health;
use crate::hooks::{self, HookEnv};
use crate::journal::{Entry, Phase, Progress};
use chrono::Utc;
use convoy_message::names::{Name, ReleaseId};
use convoy_message::{
    Action, Body, Command, DeployOutcome, DeployProgress, DeployResult, DeploySpec,
    InventoryReport, Message, Step, StepReport, StepState,
};
use convoy_release::{AppRoot, ReleaseInfo};
use std::time::{Duration, Instant};

/// The end of a command: outcome, whether `current` was switched back, and why.
struct End {
    outcome: DeployOutcome,
    rolled_back: bool,
    error: Option<String>,
}

impl End {
    fn ok() -> Self {
        Self {
            outcome: DeployOutcome::Succeeded,
            rolled_back: false,
            error: None,
        }
    }
    fn failed(error: impl Into<String>) -> Self {
        Self {
            outcome: DeployOutcome::Failed,
            rolled_back: false,
            error: Some(error.into()),
        }
    }
    fn refused(error: impl Into<String>) -> Self {
        Self {
            outcome: DeployOutcome::Refused,
            rolled_back: false,
            error: Some(error.into()),
        }
    }
}

/// One command being executed (or recovered).
pub struct Run<'a> {
    ctx: &'a Ctx,
    entry: Entry,
    cmd: Command,
    progress: Progress,
    /// When the host deadline runs out: the command's validity (`expires_at - issued_at`,
    /// the stage's `host_deadline_s`) counted from when this host took it (its journal
    /// entry's `started_at`: waiting for the app's lock counts), so clocks need not agree.
    /// The conductor stops waiting for the host about then, so no step going forward runs
    /// past it (hooks are stopped, the switch is not made, a switched release is switched
    /// back). `None` for what puts things back — a rollback command, a revert, a recovery —
    /// which must run to the end.
    cap: Option<Instant>,
}

impl<'a> Run<'a> {
    pub fn new(ctx: &'a Ctx, entry: Entry, cmd: Command) -> Self {
        let progress = entry.progress();
        let allowed = (cmd.expires_at - cmd.issued_at)
            .to_std()
            .unwrap_or(Duration::ZERO);
        let waited = (Utc::now() - progress.started_at)
            .to_std()
            .unwrap_or(Duration::ZERO);
        let cap = match cmd.action {
            Action::Rollback { .. } | Action::Inventory => None,
            Action::Deploy(_) | Action::Switch { .. } => {
                Some(Instant::now() + allowed.saturating_sub(waited))
            }
        };
        Self {
            ctx,
            entry,
            cmd,
            progress,
            cap,
        }
    }

    /// Why the next step must not start: the host deadline has passed.
    fn overdue(&self, before: &str) -> Option<String> {
        let cap = self.cap?;
        (Instant::now() >= cap).then(|| {
            format!(
                "the host deadline ({}) passed before {before}: the conductor no longer waits for this host",
                self.allowed()
            )
        })
    }

    /// The host deadline, as an operator reads it: "600 s from when this host took the command".
    fn allowed(&self) -> String {
        let s = (self.cmd.expires_at - self.cmd.issued_at)
            .num_seconds()
            .max(0);
        format!("{s} s from when this host took the command")
    }

    /// `limit`, or less when the host deadline comes first (then also true).
    fn budget(&self, limit: Duration) -> (Duration, bool) {
        match self.cap {
            Some(cap) => {
                let left = cap.saturating_duration_since(Instant::now());
                if left < limit {
                    (left, true)
                } else {
                    (limit, false)
                }
            }
            None => (limit, false),
        }
    }

    /// Runs the command (or converges after a crash) and returns its result message.
    pub async fn execute(mut self) -> Message {
        let recovering = self.progress.phase != Phase::Accepted;
        if recovering {
            // Converging restores a consistent host; it is not cut short.
            self.cap = None;
            tracing::warn!(id = %self.cmd.id, phase = ?self.progress.phase,
                "recovering a command interrupted by a restart");
            let same_boot = self.progress.hook_boot.is_some()
                && self.progress.hook_boot == crate::journal::boot_id();
            if let Some(pgid) = self.progress.hook_pgid.take()
                && same_boot
            {
                // The predecessor's hook may still run: it must not race what comes next.
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pgid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let action = self.cmd.action.clone();
        let end = match &action {
            Action::Inventory => self.inventory(),
            Action::Deploy(spec) => match self.app(&spec.app) {
                Err(end) => end,
                Ok((app, root)) if recovering => self.converge(&app, &root).await,
                Ok((app, root)) => self.deploy(spec, &app, &root).await,
            },
            Action::Rollback { app: name, release } => match self.app(name) {
                Err(end) => end,
                Ok((app, root)) if recovering => self.converge(&app, &root).await,
                Ok((app, root)) => self.rollback(release.as_ref(), &app, &root).await,
            },
            Action::Switch { app: name, release } => match self.app(name) {
                Err(end) => end,
                Ok((app, root)) if recovering => self.converge(&app, &root).await,
                Ok((app, root)) => self.switch(release, &app, &root).await,
            },
        };
        self.result(end)
    }

    fn app(&self, name: &Name) -> Result<(AppConfig, AppRoot), End> {
        let app = self
            .ctx
            .config
            .apps
            .get(name.as_str())
            .cloned()
            .ok_or_else(|| {
                End::refused(format!(
                    "app {name:?} is not configured on host {}",
                    self.ctx.host
                ))
            })?;
        let root = AppRoot::new(&app.root);
        root.ensure_layout()
            .map_err(|e| End::failed(format!("cannot prepare the app root: {e}")))?;
        Ok((app, root))
    }

    /// Records the phase before acting on it. Callers about to touch `current` must not go
    /// on when this fails: a crash could then not be recovered exactly.
    fn save(&mut self, phase: Phase) -> Result<(), String> {
        self.progress.phase = phase;
        self.entry.save_progress(&self.progress).map_err(|e| {
            tracing::error!(error = %e, "cannot write the journal");
            format!("cannot write the journal: {e}")
        })
    }

    fn app_name(&self) -> Option<Name> {
        self.cmd.action.app().cloned()
    }

    fn announce(&self, step: Step, state: StepState, duration: Option<Duration>) {
        let (Some(app), Some(release)) = (self.app_name(), self.progress.target.clone()) else {
            return;
        };
        let body = Body::Progress(DeployProgress {
            command_id: self.cmd.id,
            host: self.ctx.host.clone(),
            app,
            rollout: self.cmd.rollout.clone(),
            release,
            step,
            state,
            duration_ms: duration.map(|d| d.as_millis() as u64),
        });
        self.ctx
            .outbox
            .event(&Message::new(self.ctx.from.clone(), body));
    }

    fn report(
        &mut self,
        step: Step,
        state: StepState,
        exit_code: Option<i32>,
        duration: Duration,
        tail: String,
    ) {
        self.progress.steps.push(StepReport {
            step,
            state,
            exit_code,
            duration_ms: duration.as_millis() as u64,
            output_tail: tail,
        });
        self.announce(step, state, Some(duration));
    }

    /// A step that fails before it starts: reported with no time spent, and `why` returned.
    fn refuse(&mut self, step: Step, why: String) -> Result<(), String> {
        self.report(step, StepState::Failed, None, Duration::ZERO, why.clone());
        Err(why)
    }

    fn vars(
        &self,
        app: &AppConfig,
        root: &AppRoot,
        release: &ReleaseId,
        step: Step,
    ) -> Vec<(String, String)> {
        let mut vars: Vec<(String, String)> = app
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut set = |k: &str, v: String| vars.push((format!("CONVOY_{k}"), v));
        set("HOST", self.ctx.host.to_string());
        set("ACTION", self.cmd.action.verb().to_owned());
        set("COMMAND_ID", self.cmd.id.to_string());
        set("ISSUER", self.cmd.issuer.clone());
        set("STEP", step.as_str().to_owned());
        set("ROOT", root.path().display().to_string());
        set("CURRENT_LINK", root.current_link().display().to_string());
        set("SHARED_DIR", root.shared_dir().display().to_string());
        set("RELEASE", release.to_string());
        set(
            "RELEASE_DIR",
            root.release_dir(release).display().to_string(),
        );
        if let Some(app) = self.app_name() {
            set("APP", app.to_string());
        }
        if let Some(r) = &self.cmd.rollout {
            set("ROLLOUT", r.clone());
        }
        if let Some(prev) = &self.progress.current_before {
            set("PREVIOUS_RELEASE", prev.to_string());
            set("PREVIOUS_DIR", root.release_dir(prev).display().to_string());
        }
        if let Some(info) = root.info(release) {
            set("COMMIT", info.commit.to_string());
            set("REF", info.git_ref.to_string());
        } else if let Action::Deploy(spec) = &self.cmd.action {
            set("COMMIT", spec.commit.to_string());
            set("REF", spec.git_ref.to_string());
        }
        if matches!(&self.cmd.action, Action::Deploy(s) if s.no_switch) {
            set("PREVIEW", "1".to_owned());
        }
        vars
    }

    /// Runs one configured hook as a step; a missing hook is a skipped step.
    async fn hook(
        &mut self,
        step: Step,
        command: Option<&HookCommand>,
        timeout_s: u64,
        app: &AppConfig,
        root: &AppRoot,
        release: &ReleaseId,
    ) -> Result<(), String> {
        let Some(command) = command else {
            self.report(
                step,
                StepState::Skipped,
                None,
                Duration::ZERO,
                String::new(),
            );
            return Ok(());
        };
        if let Some(why) = self.overdue(&format!("the {} hook", step.as_str())) {
            return self.refuse(step, why);
        }
        let (timeout, by_deadline) = self.budget(Duration::from_secs(timeout_s));
        let user = match app.user.as_deref().map(nix::unistd::User::from_name) {
            None => None,
            Some(Ok(Some(u))) => Some(u),
            Some(_) => {
                let why = format!(
                    "hook user {:?} does not exist",
                    app.user.as_deref().unwrap_or("")
                );
                return self.refuse(step, why);
            }
        };
        self.announce(step, StepState::Started, None);
        let vars = self.vars(app, root, release, step);
        let dir = root.release_dir(release);
        let entry = self.entry.clone();
        let snapshot = self.progress.clone();
        let remember = move |pgid: i32| {
            let mut p = snapshot.clone();
            p.hook_pgid = Some(pgid);
            p.hook_boot = crate::journal::boot_id();
            let _ = entry.save_progress(&p);
        };
        let env = HookEnv {
            cwd: &dir,
            vars: &vars,
            user: user.as_ref(),
            timeout,
            on_spawn: Some(&remember),
        };
        let run = hooks::run(&command.argv(), &env).await;
        self.progress.hook_pgid = None;
        // Forget the group at once: its id may be reused by anything after this.
        let _ = self.entry.save_progress(&self.progress);
        let state = if run.ok() {
            StepState::Succeeded
        } else {
            StepState::Failed
        };
        self.report(
            step,
            state,
            run.exit_code,
            run.duration,
            run.output_tail.clone(),
        );
        if run.ok() {
            Ok(())
        } else if run.timed_out && by_deadline {
            Err(format!(
                "{} was stopped at the host deadline ({}) after {:?}: the conductor no longer waits for this host",
                step.as_str(),
                self.allowed(),
                run.duration
            ))
        } else {
            Err(run.describe(step.as_str()))
        }
    }

    async fn health(
        &mut self,
        app: &AppConfig,
        root: &AppRoot,
        release: &ReleaseId,
    ) -> Result<(), String> {
        let Some(spec) = &app.health else {
            self.report(
                Step::Health,
                StepState::Skipped,
                None,
                Duration::ZERO,
                String::new(),
            );
            return Ok(());
        };
        if let Some(why) = self.overdue("the health check") {
            return self.refuse(Step::Health, why);
        }
        self.announce(Step::Health, StepState::Started, None);
        let vars = self.vars(app, root, release, Step::Health);
        let dir = root.release_dir(release);
        let user = match app.user.as_deref().map(nix::unistd::User::from_name) {
            None => None,
            Some(Ok(Some(u))) => Some(u),
            Some(_) => {
                let why = format!(
                    "health check user {:?} does not exist",
                    app.user.as_deref().unwrap_or("")
                );
                return self.refuse(Step::Health, why);
            }
        };
        let env = HookEnv {
            cwd: &dir,
            vars: &vars,
            user: user.as_ref(),
            timeout: Duration::from_secs(spec.try_timeout_s),
            on_spawn: None,
        };
        let outcome = health::check(spec, &env, self.cap).await;
        let state = if outcome.healthy {
            StepState::Succeeded
        } else {
            StepState::Failed
        };
        self.report(
            Step::Health,
            state,
            None,
            outcome.duration,
            outcome.detail.clone(),
        );
        if outcome.healthy {
            Ok(())
        } else if let Some(why) = self.overdue("the release was healthy") {
            Err(format!("health check stopped: {why}"))
        } else {
            Err(format!(
                "health check failed: {}",
                outcome.detail.lines().next().unwrap_or("")
            ))
        }
    }

    async fn deploy(&mut self, spec: &DeploySpec, app: &AppConfig, root: &AppRoot) -> End {
        // The app's code comes from the app's own repository: a command naming another
        // mirror on this host is refused, however it was signed.
        let repo = app.repo.as_deref().unwrap_or(spec.app.as_str());
        if repo != spec.repo.as_str() {
            return End::refused(format!(
                "the command takes app {} from repository {}, but this host's apps.{}.repo is {} \
                 (default: the app's name): set it in agent.toml if {} is right",
                spec.app, spec.repo, spec.app, repo, spec.repo
            ));
        }
        let release = spec.release.clone();
        let current = root.current().ok().flatten();
        self.progress.target = Some(release.clone());
        self.progress.current_before = current.clone();
        self.progress.previous_before = root.previous().ok().flatten();
        if current.as_ref() == Some(&release) && spec.no_switch {
            return End::refused(format!(
                "release {release} is current; a preview needs a release id of its own"
            ));
        }
        if current.as_ref() == Some(&release) {
            let _ = self.save(Phase::Complete);
            return End {
                error: Some(format!(
                    "release {release} is already current; nothing to do"
                )),
                ..End::ok()
            };
        }
        if root.release_dir(&release).exists() {
            if self.progress.previous_before.as_ref() == Some(&release) {
                return End::refused(format!(
                    "release {release} exists as the previous release; roll back to it instead of redeploying it"
                ));
            }
            // A leftover of an earlier attempt: start from a clean directory.
            if let Err(e) = root.remove_release(&release) {
                return End::failed(format!("cannot remove the leftover release directory: {e}"));
            }
        }
        if let Some(why) = self.overdue("the export") {
            return End::failed(why);
        }
        self.progress.created_release = true;
        let _ = self.save(Phase::Export);
        self.announce(Step::Export, StepState::Started, None);
        let started = Instant::now();
        let source = export::Source {
            mirror: export::mirror_path(&self.ctx.config.mirror_dir, spec.repo.as_str()),
            git_ref: spec.git_ref.clone(),
            commit: spec.commit.clone(),
        };
        let exported =
            export::export_release(source, root, &release, &app.shared, app.user.as_deref()).await;
        match exported {
            Ok(fetched) => {
                let note = if fetched {
                    "fetched the mirror first\n"
                } else {
                    ""
                };
                self.report(
                    Step::Export,
                    StepState::Succeeded,
                    None,
                    started.elapsed(),
                    note.into(),
                );
            }
            Err(e) => {
                self.report(
                    Step::Export,
                    StepState::Failed,
                    None,
                    started.elapsed(),
                    e.to_string(),
                );
                let _ = root.remove_release(&release);
                if e.is_refusal() {
                    self.ctx
                        .dead_letter_copy(&self.entry, "ref_moved", &e.to_string())
                        .await;
                    return End::refused(e.to_string());
                }
                return End::failed(format!("export failed: {e}"));
            }
        }

        if let Some(why) = self.overdue("the build") {
            let _ = root.remove_release(&release);
            return End::failed(why);
        }
        let _ = self.save(Phase::Build);
        if let Err(e) = self
            .hook(
                Step::Build,
                app.hooks.build.as_ref(),
                app.timeouts.build_s,
                app,
                root,
                &release,
            )
            .await
        {
            let _ = root.remove_release(&release);
            return End::failed(e);
        }
        let info = ReleaseInfo {
            release: release.clone(),
            commit: spec.commit.clone(),
            git_ref: spec.git_ref.clone(),
            command_id: self.cmd.id,
            created_at: Utc::now(),
        };
        if let Err(e) = root.mark_complete(&info) {
            let _ = root.remove_release(&release);
            return End::failed(format!("cannot mark the release complete: {e}"));
        }

        let _ = self.save(Phase::PreSwitch);
        if let Err(e) = self
            .hook(
                Step::PreSwitch,
                app.hooks.pre_switch.as_ref(),
                app.timeouts.pre_switch_s,
                app,
                root,
                &release,
            )
            .await
        {
            let _ = root.remove_release(&release);
            return End::failed(e);
        }
        if spec.no_switch {
            // A preview: checked, ready, not switched. A `switch` command finishes it.
            if let Err(e) = self.health(app, root, &release).await {
                return End::failed(e);
            }
            let _ = self.save(Phase::Complete);
            return End::ok();
        }
        self.switch_to(&release, app, root).await
    }

    async fn rollback(&mut self, to: Option<&ReleaseId>, app: &AppConfig, root: &AppRoot) -> End {
        let current = root.current().ok().flatten();
        let previous = root.previous().ok().flatten();
        let Some(target) = to.cloned().or(previous.clone()) else {
            return End::refused("there is no previous release to roll back to");
        };
        self.progress.target = Some(target.clone());
        self.progress.current_before = current.clone();
        self.progress.previous_before = previous;
        if current.as_ref() == Some(&target) {
            let _ = self.save(Phase::Complete);
            return End {
                error: Some(format!(
                    "release {target} is already current; nothing to do"
                )),
                ..End::ok()
            };
        }
        if !root.is_complete(&target) {
            return End::refused(format!(
                "release {target} is not a complete release on this host"
            ));
        }
        self.switch_to(&target, app, root).await
    }

    async fn switch(&mut self, release: &ReleaseId, app: &AppConfig, root: &AppRoot) -> End {
        self.rollback(Some(release), app, root).await
    }

    /// Switch, restart, health, post-switch; any failure switches back.
    async fn switch_to(&mut self, target: &ReleaseId, app: &AppConfig, root: &AppRoot) -> End {
        if let Some(why) = self.overdue("the switch") {
            return self.abandon(root, why);
        }
        if let Err(e) = self.save(Phase::Switch) {
            return End::failed(format!("{e}; not switching"));
        }
        self.ctx.faults.hit("before_switch");
        self.announce(Step::Switch, StepState::Started, None);
        let started = Instant::now();
        let switched = root
            .set_previous(self.progress.current_before.as_ref())
            .and_then(|()| root.switch_current(target));
        if let Err(e) = switched {
            self.report(
                Step::Switch,
                StepState::Failed,
                None,
                started.elapsed(),
                e.to_string(),
            );
            // The rename is atomic: current is either untouched or switched; find out.
            if root.current().ok().flatten().as_ref() == Some(target) {
                return self.revert(app, root, format!("switch failed: {e}")).await;
            }
            let _ = root.set_previous(self.progress.previous_before.as_ref());
            return End::failed(format!("switch failed: {e}"));
        }
        self.report(
            Step::Switch,
            StepState::Succeeded,
            None,
            started.elapsed(),
            String::new(),
        );
        let _ = self.save(Phase::Switched);
        self.ctx.faults.hit("after_switch");

        let _ = self.save(Phase::Restart);
        if let Err(e) = self
            .hook(
                Step::Restart,
                app.hooks.restart.as_ref(),
                app.timeouts.restart_s,
                app,
                root,
                target,
            )
            .await
        {
            return self.revert(app, root, e).await;
        }
        let _ = self.save(Phase::Health);
        if let Err(e) = self.health(app, root, target).await {
            return self.revert(app, root, e).await;
        }
        let _ = self.save(Phase::PostSwitch);
        if let Err(e) = self
            .hook(
                Step::PostSwitch,
                app.hooks.post_switch.as_ref(),
                app.timeouts.post_switch_s,
                app,
                root,
                target,
            )
            .await
        {
            return self.revert(app, root, e).await;
        }
        let _ = self.save(Phase::Complete);
        self.ctx.faults.hit("before_result");
        self.prune(root, target);
        End::ok()
    }

    fn prune(&mut self, root: &AppRoot, keep: &ReleaseId) {
        match root.prune(self.ctx.config.keep_releases.max(2), &[keep]) {
            Ok(removed) if !removed.is_empty() => {
                let names: Vec<String> = removed.iter().map(ToString::to_string).collect();
                self.report(
                    Step::Cleanup,
                    StepState::Succeeded,
                    None,
                    Duration::ZERO,
                    format!("removed {}", names.join(", ")),
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "pruning old releases failed"),
        }
    }

    /// Puts `current` back on the release that was current before, and restarts it.
    async fn revert(&mut self, app: &AppConfig, root: &AppRoot, reason: String) -> End {
        // Putting the previous release back runs to the end, deadline or not.
        self.cap = None;
        // Should this entry not be saved (a full disk), recovery still knows a revert by
        // `current` being back on the release before this command (`converge`).
        if !self.ctx.faults.is("revert_unjournaled") {
            let _ = self.save(Phase::Revert);
        }
        let Some(before) = self.progress.current_before.clone() else {
            return End::failed(format!(
                "{reason}; this was the app's first release, so there is nothing to switch back to"
            ));
        };
        self.announce(Step::Revert, StepState::Started, None);
        let started = Instant::now();
        let reverted = root
            .switch_current(&before)
            .and_then(|()| root.set_previous(self.progress.previous_before.as_ref()));
        if let Err(e) = reverted {
            self.report(
                Step::Revert,
                StepState::Failed,
                None,
                started.elapsed(),
                e.to_string(),
            );
            return End::failed(format!(
                "{reason}; switching back to {before} failed too: {e} — fix by hand (docs/host.md)"
            ));
        }
        self.report(
            Step::Revert,
            StepState::Succeeded,
            None,
            started.elapsed(),
            format!("current is {before} again"),
        );
        self.ctx.faults.hit("revert_unjournaled");
        let restarted = self
            .hook(
                Step::Restart,
                app.hooks.restart.as_ref(),
                app.timeouts.restart_s,
                app,
                root,
                &before,
            )
            .await;
        let mut end = End {
            outcome: DeployOutcome::Failed,
            rolled_back: true,
            error: Some(reason),
        };
        if let Err(e) = restarted {
            end.error = end
                .error
                .map(|r| format!("{r}; restarting the previous release failed: {e}"));
        }
        // Drop the failed release if this command made it and it is not the one we are on.
        if self.progress.created_release
            && let Some(target) = self.progress.target.clone()
            && target != before
        {
            let _ = root.remove_release(&target);
        }
        end
    }

    /// After a crash: finish the command from where the journal says it stopped.
    async fn converge(&mut self, app: &AppConfig, root: &AppRoot) -> End {
        let phase = self.progress.phase;
        let target = self.progress.target.clone();
        let switched = target.is_some() && root.current().ok().flatten() == target;
        let interrupted = format!("interrupted by an agent restart during {phase:?}");
        match phase {
            Phase::Accepted => End::failed("nothing to recover"),
            Phase::Complete => End::ok(),
            Phase::Export | Phase::Build | Phase::PreSwitch => self.abandon(root, interrupted),
            Phase::Switch if !switched => {
                let _ = root.set_previous(self.progress.previous_before.as_ref());
                self.abandon(root, interrupted)
            }
            Phase::Switched | Phase::Restart | Phase::Health | Phase::PostSwitch
                if !switched
                    && self.progress.current_before.is_some()
                    && root.current().ok().flatten() == self.progress.current_before =>
            {
                // current is back on the release before this command though the journal
                // never said Revert (that entry could not be saved: a full disk): a revert
                // cut short, perhaps before the previous release was restarted. Finish it.
                self.revert(app, root, format!("{interrupted}, after the switch"))
                    .await
            }
            Phase::Switch
            | Phase::Switched
            | Phase::Restart
            | Phase::Health
            | Phase::PostSwitch
                if !switched =>
            {
                // Something else moved current since: leave it alone.
                let now = root.current().ok().flatten();
                End::failed(format!(
                    "{interrupted}, after the switch; current is now {} and was left as it is",
                    now.map(|r| r.to_string()).unwrap_or_else(|| "unset".into())
                ))
            }
            Phase::Switch
            | Phase::Switched
            | Phase::Restart
            | Phase::Health
            | Phase::PostSwitch
            | Phase::Revert => {
                self.revert(app, root, format!("{interrupted}, after the switch"))
                    .await
            }
        }
    }

    fn abandon(&mut self, root: &AppRoot, why: String) -> End {
        if self.progress.created_release
            && let Some(target) = &self.progress.target
            && root.current().ok().flatten().as_ref() != Some(target)
        {
            let _ = root.remove_release(target);
        }
        End::failed(format!("{why}; current was not touched"))
    }

    fn inventory(&mut self) -> End {
        let mut report = InventoryReport {
            command_id: self.cmd.id,
            host: self.ctx.host.clone(),
            apps: Default::default(),
            releases: Default::default(),
        };
        for (name, app) in &self.ctx.config.apps {
            let Ok(name) = Name::new(name.as_str()) else {
                continue;
            };
            let root = AppRoot::new(&app.root);
            report.apps.insert(name.clone(), root.state());
            report
                .releases
                .insert(name, root.releases().unwrap_or_default());
        }
        self.ctx.outbox.event(&Message::new(
            self.ctx.from.clone(),
            Body::Inventory(report),
        ));
        let _ = self.save(Phase::Complete);
        End::ok()
    }

    /// Ends the command without running it (e.g. its app lock cannot be taken).
    pub fn fail_now(self, why: String) -> Message {
        self.result(End::failed(why))
    }

    fn result(self, end: End) -> Message {
        let app = self.app_name();
        let (current, previous) = match app
            .as_ref()
            .and_then(|a| self.ctx.config.apps.get(a.as_str()))
        {
            Some(cfg) => {
                let state = AppRoot::new(&cfg.root).state();
                (state.current, state.previous)
            }
            None => (None, None),
        };
        let finished_at = Utc::now();
        let duration = (finished_at - self.progress.started_at)
            .num_milliseconds()
            .max(0) as u64;
        let result = DeployResult {
            command_id: self.cmd.id,
            host: self.ctx.host.clone(),
            action: self.cmd.action.verb().to_owned(),
            app,
            rollout: self.cmd.rollout.clone(),
            release: self.progress.target.clone(),
            outcome: end.outcome,
            rolled_back: end.rolled_back,
            current,
            previous,
            steps: self.progress.steps.clone(),
            error: end.error,
            started_at: self.progress.started_at,
            duration_ms: duration,
            finished_at: Some(finished_at),
        };
        Message::new(self.ctx.from.clone(), Body::Result(result))
    }
}
