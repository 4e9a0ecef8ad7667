//! A minimal `newc` cpio writer: what the kernel unpacks as an initramfs.
//!
//! Every entry's parent folders are written before it, once each, so callers name only the
//! folders that stay empty.

use std::collections::BTreeSet;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, Default)]
pub struct Cpio {
    out: Vec<u8>,
    ino: u32,
    dirs: BTreeSet<String>,
}

impl Cpio {
    fn header(&mut self, name: &str, mode: u32, size: usize, rdev: (u32, u32)) {
        self.parents(name);
        self.ino += 1;
        let namesize = name.len() + 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            size as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            namesize as u32,
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            write!(self.out, "{f:08X}").expect("write to vec");
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    /// A folder (and its parents); asking again is a no-op.
    pub fn dir(&mut self, name: &str) {
        if !self.dirs.contains(name) {
            self.header(name, 0o040755, 0, (0, 0));
            self.dirs.insert(name.to_string());
        }
    }

    /// Every parent folder of `name`, outermost first.
    fn parents(&mut self, name: &str) {
        let mut end = 0;
        while let Some(i) = name[end..].find('/') {
            end += i;
            self.dir(&name[..end]);
            end += 1;
        }
    }

    /// A file, after its parent folders.
    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.parents(name);
        self.header(name, 0o100000 | mode, data.len(), (0, 0));
        self.out.extend_from_slice(data);
        self.pad();
    }

    /// A symbolic link: its target is the entry's data.
    pub fn symlink(&mut self, name: &str, target: &str) {
        self.header(name, 0o120777, target.len(), (0, 0));
        self.out.extend_from_slice(target.as_bytes());
        self.pad();
    }

    /// The folders of an initramfs and the two device nodes its `/init` needs before it can
    /// mount devtmpfs (`/dev/console`, `/dev/null`).
    pub fn skeleton(&mut self, dirs: &[&str]) {
        for d in dirs {
            self.dir(d);
        }
        self.char_dev("dev/console", 5, 1);
        self.char_dev("dev/null", 1, 3);
    }

    pub fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.header(name, 0o020600, 0, (major, minor));
    }

    /// `rel` of the tree `base`, recursively: folders, files with their modes, symlinks as
    /// symlinks (libraries' sonames are links); entries named in `skip` (relative paths) and
    /// what is under them are left out.
    pub fn tree(&mut self, base: &Path, rel: &Path, skip: &[&str]) -> io::Result<()> {
        let path = base.join(rel);
        let name = rel.to_str().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not UTF-8", path.display()),
            )
        })?;
        if skip.contains(&name) {
            return Ok(());
        }
        let meta = std::fs::symlink_metadata(&path)?;
        let kind = meta.file_type();
        if kind.is_dir() {
            if !name.is_empty() {
                self.dir(name);
            }
            let mut entries: Vec<PathBuf> = std::fs::read_dir(&path)?
                .map(|e| e.map(|e| rel.join(e.file_name())))
                .collect::<io::Result<_>>()?;
            entries.sort();
            for e in entries {
                self.tree(base, &e, skip)?;
            }
        } else if kind.is_symlink() {
            let target = std::fs::read_link(&path)?;
            self.symlink(name, &target.to_string_lossy());
        } else if kind.is_file() {
            self.file(
                name,
                meta.permissions().mode() & 0o7777,
                &std::fs::read(&path)?,
            );
        }
        Ok(())
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.header("TRAILER!!!", 0, 0, (0, 0));
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_aligned_and_terminated() {
        let mut c = Cpio::default();
        c.dir("bin");
        c.file("bin/x", 0o755, b"hello");
        let out = c.finish();
        assert_eq!(out.len() % 4, 0);
        assert!(out.starts_with(b"070701"));
        assert!(out.windows(10).any(|w| w == b"TRAILER!!!"));
    }

    /// Names of the entries, in order, read back from the archive.
    fn names(out: &[u8]) -> Vec<(u32, String)> {
        let mut names = Vec::new();
        let mut at = 0;
        let field = |at: usize, i: usize| {
            let s = std::str::from_utf8(&out[at + 6 + i * 8..at + 14 + i * 8]).expect("hex");
            u32::from_str_radix(s, 16).expect("hex") as usize
        };
        loop {
            let (mode, size, namesize) = (field(at, 1), field(at, 6), field(at, 11));
            let name = String::from_utf8_lossy(&out[at + 110..at + 110 + namesize - 1]).into();
            if name == "TRAILER!!!" {
                return names;
            }
            names.push((mode as u32, name));
            at = (at + 110 + namesize).next_multiple_of(4);
            at = (at + size).next_multiple_of(4);
        }
    }

    #[test]
    fn directories_once_parents_first_and_symlinks() {
        let mut c = Cpio::default();
        c.dir("usr");
        c.symlink("usr/lib/x/libfoo.so.1", "libfoo.so.1.0");
        c.dir("usr/lib");
        c.file("usr/lib/x/libfoo.so.1.0", 0o644, b"elf");
        let got = names(&c.finish());
        let want = [
            (0o040755, "usr"),
            (0o040755, "usr/lib"),
            (0o040755, "usr/lib/x"),
            (0o120777, "usr/lib/x/libfoo.so.1"),
            (0o100644, "usr/lib/x/libfoo.so.1.0"),
        ];
        let got: Vec<(u32, &str)> = got.iter().map(|(m, n)| (*m, n.as_str())).collect();
        assert_eq!(got, want);
    }
}
