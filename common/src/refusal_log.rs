//! Refusals logged at a bounded rate, so that a flood of forged requests cannot become a flood
//! of log lines: at most [`REFUSAL_LOG_MAX`] WARN lines per [`REFUSAL_LOG_WINDOW`]; the rest are
//! counted, and the count is logged when the window ends. The relay (refused agents, clients
//! and connections) and the backend (refused handshakes) both log through it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::Instrument;

/// Most refusals logged per [`REFUSAL_LOG_WINDOW`].
pub const REFUSAL_LOG_MAX: u32 = 10;
pub const REFUSAL_LOG_WINDOW: Duration = Duration::from_secs(10);

/// A WARN log of refusals at a bounded rate (needs a tokio runtime: the count of lines held
/// back is reported by a task at the end of the window).
#[derive(Debug)]
pub struct RefusalLog {
    limit: Mutex<LogLimit>,
    /// What the count line counts, e.g. "refused WebSocket handshakes".
    what: &'static str,
}

impl RefusalLog {
    pub fn new(what: &'static str) -> Arc<Self> {
        Arc::new(Self {
            limit: Mutex::new(LogLimit::new(REFUSAL_LOG_MAX, REFUSAL_LOG_WINDOW)),
            what,
        })
    }

    /// Logs `line()` at WARN, or counts it when this window's lines are used up.
    pub fn log(self: &Arc<Self>, line: impl FnOnce() -> String) {
        let verdict = self.lock().check(Instant::now());
        match verdict {
            LogVerdict::Log => tracing::warn!("{}", line()),
            LogVerdict::Suppress { first: false, .. } => {}
            LogVerdict::Suppress {
                first: true,
                report_at,
            } => {
                let log = self.clone();
                // Not in the caller's span: the count covers many connections.
                tokio::spawn(
                    async move {
                        tokio::time::sleep_until(report_at.into()).await;
                        let n = log.lock().take_suppressed();
                        if n > 0 {
                            tracing::warn!(
                                "{n} more {} were not logged (at most {REFUSAL_LOG_MAX} are logged per {REFUSAL_LOG_WINDOW:?})",
                                log.what
                            );
                        }
                    }
                    .instrument(tracing::Span::none()),
                );
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LogLimit> {
        self.limit.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What to do with one refusal's log line.
#[derive(Debug, PartialEq, Eq)]
pub enum LogVerdict {
    Log,
    /// Count it. `first` when it is the first uncounted refusal since the last report: the
    /// caller arranges for [`LogLimit::take_suppressed`] to be reported at `report_at`.
    Suppress {
        first: bool,
        report_at: Instant,
    },
}

/// At most `max` lines per `window`, counted from the first line of each window.
#[derive(Debug)]
pub struct LogLimit {
    max: u32,
    window: Duration,
    window_start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl LogLimit {
    pub fn new(max: u32, window: Duration) -> Self {
        Self {
            max,
            window,
            window_start: None,
            logged: 0,
            suppressed: 0,
        }
    }

    pub fn check(&mut self, now: Instant) -> LogVerdict {
        let start = match self.window_start {
            Some(s) if now.saturating_duration_since(s) < self.window => s,
            _ => {
                self.window_start = Some(now);
                self.logged = 0;
                now
            }
        };
        if self.logged < self.max {
            self.logged += 1;
            return LogVerdict::Log;
        }
        self.suppressed += 1;
        LogVerdict::Suppress {
            first: self.suppressed == 1,
            report_at: start + self.window,
        }
    }

    /// The refusals not logged since the last call.
    pub fn take_suppressed(&mut self) -> u64 {
        std::mem::take(&mut self.suppressed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_logged_ten_per_window_and_the_rest_counted() {
        let t0 = Instant::now();
        let mut limit = LogLimit::new(3, Duration::from_secs(10));
        for i in 0..3 {
            assert_eq!(limit.check(t0 + Duration::from_millis(i)), LogVerdict::Log);
        }
        let end = t0 + Duration::from_secs(10);
        assert_eq!(
            limit.check(t0 + Duration::from_secs(1)),
            LogVerdict::Suppress {
                first: true,
                report_at: end
            }
        );
        assert_eq!(
            limit.check(t0 + Duration::from_secs(2)),
            LogVerdict::Suppress {
                first: false,
                report_at: end
            }
        );
        assert_eq!(limit.take_suppressed(), 2);
        assert_eq!(limit.take_suppressed(), 0);
        // A new window logs again.
        assert_eq!(limit.check(end), LogVerdict::Log);
        // A count not yet reported when a window ends is kept for the report, not lost.
        for _ in 0..2 {
            limit.check(end);
        }
        assert!(matches!(
            limit.check(end),
            LogVerdict::Suppress { first: true, .. }
        ));
        assert_eq!(limit.check(end + Duration::from_secs(10)), LogVerdict::Log);
        assert_eq!(limit.take_suppressed(), 1);
    }
}
