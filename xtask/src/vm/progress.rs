//! Following a VM's console: the marker lines stage 1 and stage 2 print become progress lines
//! on the terminal and the facts the verdict needs (did the tests start, did they finish).

use std::path::Path;

use super::{report::BinaryResult, stage2::MARK};

pub struct Progress<'a> {
    /// "vm: [6.1]", in front of every progress line.
    tag: &'a str,
    share: &'a Path,
    /// Stage 2 is running: the root is mounted and the machine set up.
    pub ready: bool,
    /// Stage 2 ran every binary it was going to run.
    pub finished: bool,
    /// Why stage 1 could not build the root, if it said so.
    pub stage1_failure: Option<String>,
}

impl<'a> Progress<'a> {
    pub fn new(tag: &'a str, share: &'a Path) -> Self {
        Self { tag, share, ready: false, finished: false, stage1_failure: None }
    }

    pub fn line(&mut self, line: &str) {
        let Some(mark) = marker(line) else { return };
        let tag = self.tag;
        if let Some(release) = mark.strip_prefix("ready ") {
            self.ready = true;
            eprintln!("{tag} {release} is up; running the tests");
        } else if let Some(name) = mark.strip_prefix("begin ") {
            eprintln!("{tag} {name} ...");
        } else if let Some(rest) = mark.strip_prefix("end ") {
            let name = rest.split_whitespace().next().unwrap_or(rest);
            eprintln!("{tag} {}", BinaryResult::read(self.share, name).line());
        } else if mark == "done" {
            self.finished = true;
        } else if let Some(why) = mark.strip_prefix("stage 1 failed: ") {
            self.stage1_failure = Some(why.to_owned());
        }
    }
}

/// The text after stage 1's or stage 2's marker, wherever in the line it starts (kernel
/// messages can land in front of it on the shared console).
fn marker(line: &str) -> Option<&str> {
    line.find(MARK).map(|i| line[i + MARK.len()..].trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_found_after_kernel_noise() {
        assert_eq!(marker("egressfw-vm: begin enforcement"), Some("begin enforcement"));
        assert_eq!(marker("[   3.1] veth: loaded egressfw-vm: end x rc=0"), Some("end x rc=0"));
        assert_eq!(marker("[   3.1] random: crng init done"), None);
    }

    #[test]
    fn the_facts_come_from_the_markers() {
        let mut p = Progress::new("vm: [t]", Path::new("/nonexistent"));
        p.line("egressfw-vm: stage 1 failed: mounting the host root (9p tag hostroot)");
        assert_eq!(p.stage1_failure.as_deref(), Some("mounting the host root (9p tag hostroot)"));
        p.line("egressfw-vm: ready 6.1.0-56-amd64");
        p.line("egressfw-vm: done");
        assert!(p.ready && p.finished);
    }
}
