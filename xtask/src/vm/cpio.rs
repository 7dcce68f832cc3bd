//! A writer for the "newc" cpio format the kernel unpacks as an initramfs. Written here rather
//! than staged on disk for `cpio`: owners, modes and the /dev/console node come out exactly as
//! listed, with no root-owned scratch tree to build and clean up.

use std::io::{self, Write};

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

pub struct Cpio<W: Write> {
    out: W,
    written: usize,
    next_inode: u32,
}

impl<W: Write> Cpio<W> {
    pub fn new(out: W) -> Self {
        Self { out, written: 0, next_inode: 1 }
    }

    pub fn dir(&mut self, path: &str) -> io::Result<()> {
        self.entry(path, S_IFDIR | 0o755, (0, 0), &[])
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        self.entry(path, S_IFREG | mode, (0, 0), data)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.entry(path, S_IFLNK | 0o777, (0, 0), target.as_bytes())
    }

    /// A character device node, e.g. /dev/console (5, 1): the kernel opens it for init's
    /// stdio before init runs, so it must exist before devtmpfs is mounted.
    pub fn char_device(&mut self, path: &str, mode: u32, (major, minor): (u32, u32)) -> io::Result<()> {
        self.entry(path, S_IFCHR | mode, (major, minor), &[])
    }

    /// Writes the trailer and returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        self.next_inode = 0;
        self.entry("TRAILER!!!", 0, (0, 0), &[])?;
        Ok(self.out)
    }

    fn entry(&mut self, path: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> io::Result<()> {
        let name = path.trim_start_matches('/');
        let nlink = if mode & S_IFDIR == S_IFDIR { 2 } else { 1 };
        let size =
            u32::try_from(data.len()).map_err(|_| io::Error::other(format!("{path} is over 4 GiB")))?;
        let namesize = u32::try_from(name.len() + 1).map_err(|_| io::Error::other("name too long"))?;
        let ino = self.next_inode;
        self.next_inode += 1;
        // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor,
        // rdevminor, namesize, check: each eight hex digits.
        let fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0];
        let mut header = String::from("070701");
        for f in fields {
            header.push_str(&format!("{f:08x}"));
        }
        self.write(header.as_bytes())?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad()?;
        self.write(data)?;
        self.pad()
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len();
        Ok(())
    }

    /// Headers and data start on four-byte boundaries.
    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - self.written % 4) % 4;
        self.write(&[0; 3][..n])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_newc_headers_padded_to_four_bytes() {
        let mut c = Cpio::new(Vec::new());
        c.file("/init", 0o755, b"#!/bin/sh\n").unwrap();
        let out = c.finish().unwrap();
        // 110-byte header, "init\0" padded to 116, 10 bytes of data padded to 128.
        assert_eq!(&out[..6], b"070701");
        assert_eq!(&out[14..22], b"000081ed", "regular file, mode 0755");
        assert_eq!(&out[54..62], b"0000000a", "file size");
        assert_eq!(&out[94..102], b"00000005", "name size with the NUL");
        assert_eq!(&out[110..115], b"init\0");
        assert_eq!(&out[116..126], b"#!/bin/sh\n");
        assert_eq!(&out[128..134], b"070701");
        assert!(out.windows(10).any(|w| w == b"TRAILER!!!"));
        assert_eq!(out.len() % 4, 0);
    }
}
