//! The initramfs for one kernel: static busybox, the stage 1 init script and the modules that
//! mount the host's root. It is small (a few MB) and rebuilt on every run.

use std::{fs, path::PathBuf};

use anyhow::{Context as _, Result};

use super::{cpio::Cpio, kernel::Kernel, modules};

/// From `busybox-static`: the initramfs has no libc to link against.
const BUSYBOX: &str = "/bin/busybox";

const INIT: &str = include_str!("init.sh");

/// Writes `initramfs.cpio` next to the extracted kernel and returns its path.
pub fn build(kernel: &Kernel) -> Result<PathBuf> {
    let path = kernel.dir().join("initramfs.cpio");
    let image = image(kernel).with_context(|| format!("building the initramfs for {}", kernel.label()))?;
    fs::write(&path, image).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

fn image(kernel: &Kernel) -> Result<Vec<u8>> {
    let busybox = fs::read(BUSYBOX).with_context(|| format!("reading {BUSYBOX} (package busybox-static)"))?;
    let modules = modules::for_root(&kernel.modules())?;
    let mut c = Cpio::new(Vec::new());
    for dir in ["/bin", "/dev", "/proc", "/sys", "/modules", "/lower", "/rw", "/newroot"] {
        c.dir(dir)?;
    }
    c.char_device("/dev/console", 0o600, (5, 1))?;
    c.file("/bin/busybox", 0o755, &busybox)?;
    // The interpreter of /init; `busybox --install` links the other applets.
    c.symlink("/bin/sh", "busybox")?;
    c.file("/init", 0o755, INIT.as_bytes())?;
    let mut order = String::new();
    for (name, data) in &modules {
        c.file(&format!("/modules/{name}"), 0o644, data)?;
        order.push_str(name);
        order.push('\n');
    }
    c.file("/modules/order", 0o644, order.as_bytes())?;
    Ok(c.finish()?)
}
