//! Edits of the runtime's CNI network configuration list. The file belongs to the network plugin,
//! which rewrites it whenever it likes (Calico, Cilium and flannel do when they restart), so an
//! edit is a compare-and-swap: read, change the JSON, and put the result in place only if the
//! file still holds what was read. Otherwise the caller starts again from the new contents: a
//! network plugin's change is never replaced by a copy of the file it replaced.
//!
//! The swap is `renameat2(RENAME_EXCHANGE)`: the new file and the old one trade places in one
//! step, and what comes back out is exactly what the runtime saw until then. If that is not what
//! was read, someone wrote in between, and a second exchange puts their file back. Filesystems
//! without the flag fall back to comparing just before a plain rename (a window of one syscall).

use std::{
    ffi::CString,
    fs, io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use serde_json::Value;
use std::io::Write as _;

/// How one attempt at an edit ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Edited {
    /// The change had nothing to do.
    Unchanged,
    /// The changed list is in place.
    Swapped,
    /// The file changed (or went) between the read and the swap: nothing was written; read
    /// again and retry.
    Raced,
}

/// One attempt: reads `path`, lets `change` edit the parsed list (it returns whether it changed
/// anything), and swaps the result in if the file is still as read. `before_swap` runs between
/// the read and the swap (tests put a concurrent writer there).
pub fn edit_once(
    path: &Path,
    change: impl FnOnce(&mut Value) -> Result<bool>,
    before_swap: &mut dyn FnMut(&Path),
) -> Result<Edited> {
    let read = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Edited::Raced),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut conf: Value =
        serde_json::from_slice(&read).with_context(|| format!("{} is not valid JSON", path.display()))?;
    if !change(&mut conf)? {
        return Ok(Edited::Unchanged);
    }
    // Pretty, with a final newline, as network plugins write theirs.
    let mut bytes = serde_json::to_vec_pretty(&conf)?;
    bytes.push(b'\n');
    before_swap(path);
    if swap_if_unchanged(path, &read, &bytes)? { Ok(Edited::Swapped) } else { Ok(Edited::Raced) }
}

/// Puts `new` at `path` if `path` still holds `expected`; false (and `path` as it was) if not.
fn swap_if_unchanged(path: &Path, expected: &[u8], new: &[u8]) -> Result<bool> {
    let tmp = temporary_beside(path)?;
    let written =
        fs::OpenOptions::new().write(true).create_new(true).open(&tmp).and_then(|mut f| f.write_all(new));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", tmp.display()));
    }
    match exchange_if_unchanged(path, &tmp, expected) {
        Ok(swapped) => {
            let _ = fs::remove_file(&tmp);
            Ok(swapped)
        }
        // The temporary name may hold the network plugin's file now (a failed exchange back):
        // left in place and named, never deleted.
        Err(e) => Err(e.context(format!("{} is left as it is", tmp.display()))),
    }
}

fn exchange_if_unchanged(path: &Path, tmp: &Path, expected: &[u8]) -> Result<bool> {
    match exchange(tmp, path) {
        Ok(()) => {
            let displaced = fs::read(tmp).with_context(|| format!("reading {}", tmp.display()))?;
            if displaced == expected {
                return Ok(true);
            }
            // Someone wrote in between: their file goes back. (Only a second write of theirs in
            // the microseconds between the two exchanges could be lost now.)
            exchange(tmp, path).with_context(|| {
                format!("putting back {} (it changed while egressfw edited it)", path.display())
            })?;
            Ok(false)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) => {
            // No RENAME_EXCHANGE on this filesystem.
            let now = match fs::read(path) {
                Ok(now) => now,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
            };
            if now != expected {
                return Ok(false);
            }
            fs::rename(tmp, path)
                .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
            Ok(true)
        }
        Err(e) => Err(e).with_context(|| format!("swapping {} into place", path.display())),
    }
}

/// A new name in the same directory (a rename never crosses filesystems) that no reader of CNI
/// configurations takes for one (they read `.conf`, `.conflist` and `.json`). Unique beyond the
/// process id, which is 1 for both the init container and the agent in their own PID
/// namespaces; the file is created exclusively besides.
fn temporary_beside(path: &Path) -> Result<PathBuf> {
    static EDITS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = path.parent().context("a configuration file has a directory")?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("conflist");
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let edit = EDITS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(dir.join(format!(".{name}.egressfw-{}-{nanos:x}-{edit}.tmp", std::process::id())))
}

/// `renameat2(a, b, RENAME_EXCHANGE)`: both must exist; they trade names atomically.
fn exchange(a: &Path, b: &Path) -> io::Result<()> {
    let a = CString::new(a.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let b = CString::new(b.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: plain syscall on two valid C strings; AT_FDCWD makes relative paths work as usual.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("egressfw-conflist-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn append(conf: &mut Value) -> Result<bool> {
        conf["plugins"].as_array_mut().unwrap().push(serde_json::json!({"type": "egressfw"}));
        Ok(true)
    }

    #[test]
    fn a_write_that_lands_between_the_read_and_the_swap_is_kept() {
        let d = dir("race");
        let path = d.join("10-net.conflist");
        fs::write(&path, r#"{"plugins":[{"type":"ptp"}]}"#).unwrap();
        let theirs = "{\"plugins\":[{\"type\":\"ptp\",\"mtu\":1400}]}\n";
        // The network plugin rewrites its list (by rename, as they do) while we edit.
        let mut rewrite = |p: &Path| {
            fs::write(p.with_extension("new"), theirs).unwrap();
            fs::rename(p.with_extension("new"), p).unwrap();
        };
        assert_eq!(edit_once(&path, append, &mut rewrite).unwrap(), Edited::Raced);
        assert_eq!(fs::read_to_string(&path).unwrap(), theirs, "their write is what the file holds");
        // The retry edits their version.
        assert_eq!(edit_once(&path, append, &mut |_| {}).unwrap(), Edited::Swapped);
        let v: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["plugins"][0]["mtu"], 1400, "their change survives: {v}");
        assert_eq!(v["plugins"][1]["type"], "egressfw", "{v}");
        let leftovers: Vec<_> = fs::read_dir(&d).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left: {leftovers:?}");
        assert_eq!(edit_once(&d.join("gone.conflist"), append, &mut |_| {}).unwrap(), Edited::Raced);
        let _ = fs::remove_dir_all(&d);
    }
}
