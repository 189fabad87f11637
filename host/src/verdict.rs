//! Judging a recorded pull with a candidate puller: what `pullbox policy test` prints and
//! what the daemon's shadow puller compares with the real pull.
//!
//! [`judge`] runs the candidate's `pull-image` on the replay data plane
//! ([`crate::backend::replay`]) over a [`Recording`]: the candidate sees the same resolve
//! answers, indexes, manifests and configs as the recorded pull, and can write nowhere but
//! the replay's memory, so judging is offline, read-only and cheap (no layer is downloaded
//! or unpacked). The answer is a [`Verdict`]: allowed, denied (`permission-denied`, with the
//! puller's message naming the rule), or failed for another reason.
//!
//! [`Shadow`] is the daemon's shadow puller: after every real pull it judges the recording of
//! that pull and reports a [`Comparison`]; allow against deny either way is a disagreement.

use std::sync::Arc;

use crate::{
    backend::replay::{Recording, Replay},
    engine::Puller,
    error::Code,
    registry::NoProgress,
    session::Session,
};

/// What a puller decided about one pull.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The pull succeeded.
    Allow,
    /// The puller refused with `permission-denied`; its message names the rule.
    Deny(String),
    /// The pull failed otherwise (the recording lacks what the puller asked for, a bad
    /// image, a limit): no decision.
    Failed { code: Code, message: String },
}

impl Verdict {
    /// `allow`, `deny` or `error`.
    pub fn word(&self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny(_) => "deny",
            Verdict::Failed { .. } => "error",
        }
    }

    /// The verdict of a pull that ended with `result`.
    pub fn of<T>(result: &Result<T, (Code, String)>) -> Verdict {
        match result {
            Ok(_) => Verdict::Allow,
            Err((Code::PermissionDenied, message)) => Verdict::Deny(message.clone()),
            Err((code, message)) => Verdict::Failed { code: *code, message: message.clone() },
        }
    }
}

/// Runs `puller`'s `pull-image` for the recorded request on a replay of `recording`.
pub async fn judge(puller: &Puller, recording: &Recording) -> Verdict {
    let request = recording.request.context.request(&recording.request.reference, recording.request.platform.clone());
    let (backend, remote) = Replay::open(recording.clone());
    let session = match Session::for_pull(backend, remote, Arc::new(NoProgress)).await {
        Ok(s) => Arc::new(s),
        Err(e) => return Verdict::Failed { code: e.code(), message: e.chain() },
    };
    let result = puller.pull(session.clone(), &request).await.map_err(|e| (e.code(), e.to_string()));
    // Nothing of a replay outlives the judgment: stop what is left, drop the lease.
    let _ = session.release(false).await;
    Verdict::of(&result)
}

/// How a shadow puller's verdict compares with the real pull's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Comparison {
    /// Both allowed, or both denied.
    Agree,
    /// One allowed and the other denied.
    Disagree { real: Verdict, shadow: Verdict },
    /// One of them failed for a reason that is no decision.
    Inconclusive { real: Verdict, shadow: Verdict },
    /// The shadow puller did not judge this pull (too many judgments running).
    Skipped,
}

impl Comparison {
    /// Compares two verdicts.
    pub fn of(real: Verdict, shadow: Verdict) -> Comparison {
        match (&real, &shadow) {
            (Verdict::Allow, Verdict::Allow) | (Verdict::Deny(_), Verdict::Deny(_)) => Comparison::Agree,
            (Verdict::Failed { .. }, _) | (_, Verdict::Failed { .. }) => Comparison::Inconclusive { real, shadow },
            _ => Comparison::Disagree { real, shadow },
        }
    }

    /// `agree`, `disagree` or `inconclusive` (the metric's label).
    pub fn word(&self) -> &'static str {
        match self {
            Comparison::Agree => "agree",
            Comparison::Disagree { .. } => "disagree",
            Comparison::Inconclusive { .. } => "inconclusive",
            Comparison::Skipped => "skipped",
        }
    }
}

/// Where a shadow puller's comparisons go (the daemon counts them in its metrics).
pub type Report = Arc<dyn Fn(&Comparison) + Send + Sync>;

/// How many recorded pulls a shadow puller judges at once; a pull that ends while that many
/// are being judged is not judged (logged, and counted as `skipped`), so a burst of pulls
/// cannot queue unbounded work, nor take the sandbox's instance pool from real pulls.
pub const SHADOW_CONCURRENCY: usize = 4;

/// A candidate puller judging every real pull on the side.
pub struct Shadow {
    puller: Puller,
    report: Report,
    running: Arc<tokio::sync::Semaphore>,
}

impl Shadow {
    /// A shadow running `puller` (configured with its own settings), reporting to `report`.
    pub fn new(puller: Puller, report: Report) -> Shadow {
        Shadow { puller, report, running: Arc::new(tokio::sync::Semaphore::new(SHADOW_CONCURRENCY)) }
    }

    /// Judges `recording` in the background (see [`Shadow::compare`]), unless
    /// [`SHADOW_CONCURRENCY`] judgments are running: then the pull is reported as skipped.
    pub fn spawn_compare(self: Arc<Self>, recording: Recording, real: Verdict) {
        let Ok(permit) = self.running.clone().try_acquire_owned() else {
            tracing::info!(reference = recording.request.reference, "shadow puller busy; this pull is not judged");
            (self.report)(&Comparison::Skipped);
            return;
        };
        tokio::spawn(async move {
            self.compare(&recording, real).await;
            drop(permit);
        });
    }

    /// The shadow puller.
    pub fn puller(&self) -> &Puller {
        &self.puller
    }

    /// Judges `recording`, compares with the real pull's `real` verdict, logs a disagreement
    /// and reports the comparison.
    pub async fn compare(&self, recording: &Recording, real: Verdict) -> Comparison {
        let shadow = judge(&self.puller, recording).await;
        let comparison = Comparison::of(real, shadow);
        let reference = &recording.request.reference;
        match &comparison {
            Comparison::Agree => tracing::debug!(reference, "shadow puller agrees"),
            Comparison::Disagree { real, shadow } => tracing::warn!(
                reference,
                real = real.word(),
                shadow = shadow.word(),
                "shadow puller disagrees: {}",
                detail(real, shadow)
            ),
            Comparison::Inconclusive { real, shadow } => tracing::info!(
                reference,
                real = real.word(),
                shadow = shadow.word(),
                "shadow puller inconclusive: {}",
                detail(real, shadow)
            ),
            Comparison::Skipped => {}
        }
        (self.report)(&comparison);
        comparison
    }
}

/// The messages of two verdicts, for the log.
fn detail(real: &Verdict, shadow: &Verdict) -> String {
    let msg = |v: &Verdict| match v {
        Verdict::Allow => "allowed".to_owned(),
        Verdict::Deny(m) | Verdict::Failed { message: m, .. } => m.clone(),
    };
    format!("pull: {}; shadow: {}", msg(real), msg(shadow))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_against_deny_disagrees_and_a_failure_decides_nothing() {
        let deny = || Verdict::Deny("policy denies x: rule r".into());
        let failed = || Verdict::Failed { code: Code::NotFound, message: "not in the recording".into() };
        assert_eq!(Comparison::of(Verdict::Allow, Verdict::Allow), Comparison::Agree);
        assert_eq!(Comparison::of(deny(), Verdict::Deny("other rule".into())), Comparison::Agree);
        assert_eq!(Comparison::of(Verdict::Allow, deny()).word(), "disagree");
        assert_eq!(Comparison::of(deny(), Verdict::Allow).word(), "disagree");
        assert_eq!(Comparison::of(Verdict::Allow, failed()).word(), "inconclusive");
        assert_eq!(Comparison::of(failed(), deny()).word(), "inconclusive");
        let refused: Result<(), (Code, String)> = Err((Code::PermissionDenied, "no".into()));
        assert_eq!(Verdict::of(&refused), Verdict::Deny("no".into()));
        assert_eq!(Verdict::of(&Ok::<(), (Code, String)>(())).word(), "allow");
    }
}
