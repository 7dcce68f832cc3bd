//! What each kernel's run came to: per test binary (from the logs the VM left in the results
//! share) and per kernel, printed as a block per kernel and one closing table.

use std::{fmt::Write as _, fs, path::Path, time::Duration};

use crate::test::count;

/// One test binary's run inside the VM.
pub struct BinaryResult {
    pub name: String,
    pub passed: u64,
    pub failed: u64,
    /// Exit status; None when the VM stopped before the binary finished.
    pub rc: Option<i32>,
    /// Names of the failed tests, from libtest's closing `failures:` list.
    pub failures: Vec<String>,
}

impl BinaryResult {
    /// Reads `<name>.log` and `<name>.rc` from the results share.
    pub fn read(share: &Path, name: &str) -> Self {
        let log = fs::read_to_string(share.join(format!("{name}.log"))).unwrap_or_default();
        let rc =
            fs::read_to_string(share.join(format!("{name}.rc"))).ok().and_then(|s| s.trim().parse().ok());
        let (passed, failed) = summary(&log);
        Self { name: name.into(), passed, failed, rc, failures: failed_tests(&log) }
    }

    pub fn ok(&self) -> bool {
        self.rc == Some(0) && self.failed == 0
    }

    /// How it ended, when not by libtest's own verdict.
    pub fn note(&self) -> Option<String> {
        match self.rc {
            None => Some("did not finish".into()),
            Some(0) => None,
            // libtest's exit status when tests failed.
            Some(101) if self.failed > 0 => None,
            Some(124 | 137) => Some("timed out (killed)".into()),
            Some(rc) => Some(format!("exited with {rc}")),
        }
    }

    /// "enforcement  14 passed  1 failed"
    pub fn line(&self) -> String {
        let mut s = format!("{:<20} {:>4} passed {:>4} failed", self.name, self.passed, self.failed);
        if let Some(note) = self.note() {
            let _ = write!(s, "  ({note})");
        }
        s
    }
}

/// Passed and failed counts of a libtest run (one "test result:" line per binary).
pub fn summary(log: &str) -> (u64, u64) {
    log.lines()
        .filter_map(|l| l.strip_prefix("test result: "))
        .fold((0, 0), |(p, f), rest| (p + count(rest, " passed"), f + count(rest, " failed")))
}

/// The test names libtest lists after its last "failures:" heading (the one without output).
pub fn failed_tests(log: &str) -> Vec<String> {
    let lines: Vec<&str> = log.lines().collect();
    let Some(start) = lines.iter().rposition(|l| *l == "failures:") else { return Vec::new() };
    lines[start + 1..].iter().take_while(|l| l.starts_with("    ")).map(|l| l.trim().to_owned()).collect()
}

/// How a kernel's run ended.
pub enum Outcome {
    /// Every binary ran and passed.
    Passed,
    /// A test failed or a binary did not run to completion.
    Failed,
    /// The VM was killed at its deadline; where it was.
    TimedOut(String),
    /// The VM never reached the tests (download, boot or mount failure); the reason.
    Broken(String),
    /// Not run: an earlier kernel failed and --keep-going was not given.
    Skipped,
}

pub struct KernelReport {
    pub label: String,
    pub outcome: Outcome,
    pub binaries: Vec<BinaryResult>,
    pub duration: Duration,
}

impl KernelReport {
    pub fn ok(&self) -> bool {
        matches!(self.outcome, Outcome::Passed)
    }

    fn result(&self) -> &str {
        match &self.outcome {
            Outcome::Passed => "ok",
            Outcome::Failed => "FAILED",
            Outcome::TimedOut(_) => "TIMED OUT",
            Outcome::Broken(_) => "BROKEN",
            Outcome::Skipped => "skipped",
        }
    }

    fn totals(&self) -> (u64, u64) {
        self.binaries.iter().fold((0, 0), |(p, f), b| (p + b.passed, f + b.failed))
    }

    /// The block printed when the kernel is done: per binary counts and failed tests.
    pub fn details(&self) -> String {
        let mut s = format!("\n==> kernel {}: {} in {}\n", self.label, self.result(), minutes(self.duration));
        if let Outcome::Broken(why) | Outcome::TimedOut(why) = &self.outcome {
            let _ = writeln!(s, "    {why}");
        }
        for b in &self.binaries {
            let _ = writeln!(s, "    {}", b.line());
            for t in &b.failures {
                let _ = writeln!(s, "        failed: {t}");
            }
        }
        s
    }
}

/// The closing table: kernel | result | passed | failed | duration.
pub fn table(reports: &[KernelReport]) -> String {
    let width = reports.iter().map(|r| r.label.len()).max().unwrap_or(0).max("kernel".len());
    let mut s =
        format!("{:<width$} | {:<9} | {:>6} | {:>6} | duration\n", "kernel", "result", "passed", "failed");
    let _ = writeln!(s, "{}", "-".repeat(width + 46));
    for r in reports {
        let (passed, failed) = r.totals();
        let _ = writeln!(
            s,
            "{:<width$} | {:<9} | {passed:>6} | {failed:>6} | {}",
            r.label,
            r.result(),
            minutes(r.duration)
        );
    }
    s
}

/// "3m07s", "45s"
pub fn minutes(d: Duration) -> String {
    let secs = d.as_secs();
    if secs >= 60 { format!("{}m{:02}s", secs / 60, secs % 60) } else { format!("{secs}s") }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAILED_LOG: &str = "\
running 3 tests
test a ... ok
test b ... FAILED
test c ... FAILED

failures:

---- b stdout ----
thread 'b' panicked at tests/tests/x.rs:1:1:
boom

failures:
    b
    c

test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.10s

";

    #[test]
    fn counts_and_failed_names_come_from_libtest_output() {
        assert_eq!(summary(FAILED_LOG), (1, 2));
        assert_eq!(failed_tests(FAILED_LOG), ["b", "c"]);
        let ok =
            "test result: ok. 8 passed; 0 failed; 0 ignored; 0 measured; 3 filtered out; finished in 1s\n";
        assert_eq!(summary(ok), (8, 0));
        assert!(failed_tests(ok).is_empty());
    }

    #[test]
    fn a_binary_that_died_is_not_ok_even_without_failed_tests() {
        let b = |rc| BinaryResult { name: "x".into(), passed: 3, failed: 0, rc, failures: vec![] };
        assert!(b(Some(0)).ok());
        assert!(!b(Some(124)).ok());
        assert_eq!(b(Some(124)).note().as_deref(), Some("timed out (killed)"));
        assert_eq!(b(None).note().as_deref(), Some("did not finish"));
        assert_eq!(b(Some(139)).note().as_deref(), Some("exited with 139"));
    }

    #[test]
    fn table_has_a_row_per_kernel() {
        let r = KernelReport {
            label: "6.1 (6.1.0-56-amd64)".into(),
            outcome: Outcome::Failed,
            binaries: vec![BinaryResult {
                name: "e".into(),
                passed: 5,
                failed: 1,
                rc: Some(101),
                failures: vec![],
            }],
            duration: Duration::from_secs(187),
        };
        let t = table(&[r]);
        assert!(t.contains("6.1 (6.1.0-56-amd64) | FAILED    |      5 |      1 | 3m07s"), "{t}");
    }
}
